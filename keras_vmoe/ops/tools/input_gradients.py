"""The gradient of a model's loss with respect to its input (all three backends).

Adversarial attacks (`keras_vmoe.evaluation.pgd_attack`) differentiate the
loss with respect to the images, not the weights. Keras has no portable
`grad`, so this is the one place that asks each backend for it:

- JAX: `jax.value_and_grad` of `model.stateless_call`, jitted once per shape
  (the weights are arguments, not constants baked into the program);
- TensorFlow: a `tf.GradientTape` watching the input, in a `tf.function`;
- PyTorch: `torch.autograd.grad` on an input that requires grad (eager).

The model runs in inference mode (`training=False`): no dropout, eval
capacity, as `predict` routes.
"""

import keras


def _per_example_loss(loss_fn, model, x, y):
    outputs = model(x, training=False)
    return keras.ops.cast(loss_fn(y, outputs), "float32")


def loss_and_input_gradient(model, loss_fn):
    """Returns `step(x, y) -> (losses, gradient)`.

    `losses` (B,) are `loss_fn(y, model(x))`, one per example, and `gradient`
    is d mean(losses) / dx, of `x`'s shape (vmoe's PGD differentiates the mean
    over the batch). `loss_fn` is written with `keras.ops`.

    Example:
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> step = loss_and_input_gradient(
    ...     model, lambda y, logits: keras.ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
    ... )
    >>> losses, gradient = step(np.ones((4, 3), "float32"), np.zeros((4,), "int32"))
    >>> tuple(losses.shape), tuple(gradient.shape)
    ((4,), (4, 3))
    """
    backend = keras.backend.backend()
    # Each branch imports the backend in use only (the others may be absent).
    if backend == "jax":
        import jax

        def mean_loss(trainable, non_trainable, x, y):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            losses = keras.ops.cast(loss_fn(y, outputs), "float32")
            return keras.ops.mean(losses), losses

        gradient_fn = jax.jit(jax.value_and_grad(mean_loss, argnums=2, has_aux=True))

        def step(x, y):
            trainable = [variable.value for variable in model.trainable_variables]
            non_trainable = [variable.value for variable in model.non_trainable_variables]
            x = keras.ops.convert_to_tensor(x, "float32")
            (_, losses), gradient = gradient_fn(trainable, non_trainable, x, keras.ops.convert_to_tensor(y))
            return losses, gradient

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def step(x, y):
            x = tf.convert_to_tensor(x, tf.float32)
            with tf.GradientTape() as tape:
                tape.watch(x)
                losses = _per_example_loss(loss_fn, model, x, y)
                loss = tf.reduce_mean(losses)
            return losses, tape.gradient(loss, x)

        return step
    if backend == "torch":
        import torch

        def step(x, y):
            x = keras.ops.convert_to_tensor(x, "float32").detach().requires_grad_(True)
            with torch.enable_grad():
                losses = _per_example_loss(loss_fn, model, x, keras.ops.convert_to_tensor(y))
                (gradient,) = torch.autograd.grad(losses.mean(), x)
            return losses.detach(), gradient

        return step
    raise ValueError(
        f"loss_and_input_gradient supports the jax, tensorflow and torch backends; "
        f"the current Keras backend is '{backend}'."
    )
