"""The compiled XLA program of a Keras model's train or predict step (JAX only).

Keras' JAX trainer jits `model.train_step(state, data)` with the variables'
shardings as output shardings; this compiles the same function the same way
on a batch placed by the active distribution and returns the HLO text of
the per-device SPMD program, which shows the collectives GSPMD inserted
(`keras_vmoe.distribution.collective_report`).
"""

import keras


def _require_jax(what):
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"{what} compiles with JAX; the current Keras backend is "
            f"'{keras.backend.backend()}'. Set KERAS_BACKEND=jax."
        )


def _place(data):
    """Puts a batch on the devices as `fit` / `predict` do under the active
    distribution (sharded over its batch axis), or on the default device."""
    import jax  # The JAX backend only (checked above); absent otherwise.

    distribution = keras.distribution.distribution()

    def place(x):
        if x is None:
            return None
        x = keras.ops.convert_to_numpy(x)
        if distribution is None:
            return jax.device_put(x)
        return jax.device_put(x, distribution.get_data_layout(x.shape).backend_layout)

    return keras.tree.map_structure(place, data)


def _values(variables):
    return [variable.value for variable in variables]


def train_step_hlo(model, x, y, sample_weight=None):
    """HLO text of `model`'s compiled train step on the batch (x, y).

    The model must be compiled and have run `fit` for at least one step (so
    that its optimizer and metrics variables exist). `x` is what the model
    itself takes (a keras-hub task's preprocessor is not applied).
    """
    _require_jax("train_step_hlo")
    import jax  # The JAX backend only (checked above); absent otherwise.

    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        raise ValueError(
            "train_step_hlo needs a compiled model whose optimizer is built: "
            "call model.compile(...) and run model.fit(...) for at least one step first."
        )
    state = (
        _values(model.trainable_variables),
        _values(model.non_trainable_variables),
        _values(optimizer.variables),
        _values(model.metrics_variables),
    )
    shardings = jax.tree.map(lambda value: value.sharding, state)
    step = jax.jit(model.train_step, out_shardings=(None, shardings))
    return step.lower(state, _place((x, y, sample_weight))).compile().as_text()


def predict_step_hlo(model, x):
    """HLO text of `model`'s compiled predict step on the batch `x`."""
    _require_jax("predict_step_hlo")
    import jax  # The JAX backend only (checked above); absent otherwise.

    state = (_values(model.trainable_variables), _values(model.non_trainable_variables))
    step = jax.jit(model.predict_step)
    return step.lower(state, _place((x,))).compile().as_text()
