"""Small test helpers (keras-hub's own TestCase needs `grain`; we keep ours tiny)."""

import os
import pathlib

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "vmoe"
DATA = SHARED / "data"

requires_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"vmoe fixtures not found at {FIXTURES}")
requires_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"data sets not found at {DATA}")
CIFAR10 = DATA / "cifar10_jpeg.npz"
requires_cifar10 = pytest.mark.skipif(
    not CIFAR10.is_file(), reason=f"CIFAR-10 archive not found at {CIFAR10}"
)
COCO_CAPTIONS = DATA / "coco_mini_captions.npz"
requires_coco_captions = pytest.mark.skipif(
    not COCO_CAPTIONS.is_file(), reason=f"COCO caption pairs not found at {COCO_CAPTIONS}"
)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


FLOAT32_EPS = float(np.finfo(np.float32).eps)


def f32_atol(reference, ulps=256):
    """An absolute tolerance of `ulps` float32 ulps of the reference's scale.

    For outputs computed by two different programs (another backend, an
    exported graph, a sharded or compiled step, another CPU's kernels): their
    float32 sums run in other orders, a few to tens of ulps apart after a
    deep network. 256 ulps (3e-5 relative) covers that with room, and stays
    far below the error of any wrong weight or op.
    """
    return ulps * FLOAT32_EPS * max(1.0, float(np.max(np.abs(reference))))


def decision_margin(gates, k=1):
    """The smallest gap, over tokens, between a token's k-th and (k+1)-th
    largest gate (G, S, E): a last-bit difference flips a routing decision only
    where this is about as small as float32 noise."""
    ordered = -np.sort(-np.asarray(gates, np.float64), axis=-1)
    if ordered.shape[-1] <= k:
        return np.inf
    return float(np.min(ordered[..., k - 1] - ordered[..., k]))


def backend():
    return keras.backend.backend()


def random_images(batch, shape=(32, 32, 3), seed=0):
    return np.random.RandomState(seed).uniform(-1, 1, (batch, *shape)).astype("float32")


def tiny_vit_arguments(**overrides):
    """A 2-to-4 block ViT on 32x32 images with 8x8 patches (16 patches)."""
    arguments = dict(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=2,
        hidden_dim=32,
        mlp_dim=64,
        num_heads=2,
    )
    arguments.update(overrides)
    return arguments


def gradients(layer, inputs, seed=0, **call_kwargs):
    """Gradients of sum(layer(inputs) * a fixed random cotangent) with respect
    to the layer's trainable variables and to the inputs, as numpy arrays:
    (list in `layer.trainable_variables` order, input gradient)."""
    inputs = np.asarray(inputs, "float32")
    outputs_shape = tuple(layer(inputs, **call_kwargs).shape)
    cotangent = np.random.RandomState(seed).normal(size=outputs_shape).astype("float32")
    variables = layer.trainable_variables
    if backend() == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x):
            outputs, _ = layer.stateless_call(trainable, non_trainable, x, **call_kwargs)
            return (outputs.astype("float32") * cotangent).sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))  # One compilation, not one per op.
        weight_grads, input_grad = grad([v.value for v in variables], inputs)
    elif backend() == "tensorflow":
        import tensorflow as tf

        x = tf.constant(inputs)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(layer(x, **call_kwargs), "float32") * cotangent)
        *weight_grads, input_grad = tape.gradient(loss, list(variables) + [x])
    else:
        import torch

        x = torch.tensor(inputs, requires_grad=True)
        for variable in variables:
            variable.value.grad = None
        loss = (layer(x, **call_kwargs).float() * torch.from_numpy(cotangent)).sum()
        loss.backward()
        weight_grads, input_grad = [v.value.grad for v in variables], x.grad
    return [None if g is None else to_numpy(g) for g in weight_grads], to_numpy(input_grad)


def moe_block_tokens(backbone, images, index):
    """The (G, S, D) tokens the router of MoE block `index` sees on `images`."""
    from keras_vmoe.models.routing_inspection import router_inputs

    return router_inputs(backbone, images)[index]


def routing_decisions(backbone, images):
    """What every MoE block of `backbone` decides on `images` in eval mode.

    {block index: array}: the dispatch table (which token sits in which
    expert slot) of a sparse MoE block, the dispatch weights of a Soft MoE one.
    """
    decisions = {}
    for index in backbone.moe_layers:
        moe = backbone.get_layer(f"encoder_block_{index}").mlp
        plan, _ = moe.route(moe_block_tokens(backbone, images, index), training=False)
        decisions[index] = to_numpy(plan[0])  # Sparse: dispatch_index; soft: dispatch_weights.
    return decisions


COCO_CAPTIONS = DATA / "coco_mini_captions.npz"
requires_coco_captions = pytest.mark.skipif(
    not COCO_CAPTIONS.is_file(), reason=f"COCO caption archive not found at {COCO_CAPTIONS}"
)
