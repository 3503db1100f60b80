"""The shared checks every public layer and backbone goes through (keras-hub's
`run_layer_test` / `run_backbone_test`, for this package).

`run_layer_test` checks, on one input:
- the output shape, and `compute_output_shape` against the real output;
- the config round trip (`from_config(get_config())` gives the same config,
  and, with the same weights, the same output);
- a `.keras` file of a functional model holding the layer, saved and loaded
  in safe mode, computes the same;
- eager calls against compiled `predict`, and `predict` on a `tf.data` input;
- the layer under `mixed_bfloat16`: bfloat16 outputs, float32 variables;
- one `fit` step moves the trainable weights and gives a finite loss.
`run_backbone_test` adds the keras-hub preset round trip.
"""

import keras
import numpy as np
import tensorflow as tf

from tests.helpers import f32_atol
from tests.helpers import to_numpy


def _same(got, expected, what):
    for got_leaf, expected_leaf in zip(keras.tree.flatten(got), keras.tree.flatten(expected)):
        expected_leaf = to_numpy(expected_leaf).astype("float32")
        np.testing.assert_allclose(
            to_numpy(got_leaf).astype("float32"),
            expected_leaf,
            atol=f32_atol(expected_leaf),
            rtol=0,
            err_msg=what,
        )


def _shapes(x):
    return [tuple(leaf.shape) for leaf in keras.tree.flatten(x)]


def _batch_size(x):
    return len(keras.tree.flatten(x)[0])


def _model_of(layer, inputs):
    """A functional model around `layer` (or the layer itself if it is one)."""
    if isinstance(layer, keras.Model):
        return layer
    symbolic = keras.Input(shape=inputs.shape[1:], dtype=keras.backend.standardize_dtype(inputs.dtype))
    return keras.Model(symbolic, layer(symbolic))


def run_layer_test(
    cls,
    init_kwargs,
    inputs,
    expected_output_shape,
    tmp_path,
    custom_objects=None,
    run_mixed_precision=True,
    mixed_output_dtype="bfloat16",
    run_training=True,
):
    """Runs every check of the module docstring; returns the built layer.

    `inputs` is an array or, for a model, the structure it takes;
    `expected_output_shape` a shape or a list of the outputs' shapes
    (flattened, in `keras.tree` order).
    """
    layer = cls(**init_kwargs)
    outputs = layer(inputs)
    expected = expected_output_shape if isinstance(expected_output_shape, list) else [expected_output_shape]
    assert _shapes(outputs) == [tuple(s) for s in expected], (cls.__name__, _shapes(outputs))
    if not isinstance(layer, keras.Model):
        spec = layer.compute_output_shape(inputs.shape)
        assert tuple(spec) == tuple(outputs.shape), (cls.__name__, "compute_output_shape", spec)

    # Config round trip, same weights -> same outputs.
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config, cls.__name__
    clone(inputs)
    clone.set_weights(layer.get_weights())
    _same(clone(inputs), outputs, "config round trip")

    # A .keras file, in safe mode.
    model = _model_of(layer, inputs)
    path = tmp_path / f"{cls.__name__}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, custom_objects=custom_objects)
    _same(loaded(inputs), outputs, ".keras round trip")

    # Eager against compiled predict, and a tf.data input.
    _same(model.predict(inputs, verbose=0), outputs, "compiled predict")
    dataset = tf.data.Dataset.from_tensor_slices(inputs).batch(_batch_size(inputs))
    _same(model.predict(dataset, verbose=0), outputs, "predict on tf.data")

    if run_mixed_precision:
        mixed = cls(**{**init_kwargs, "dtype": "mixed_bfloat16"})
        for leaf in keras.tree.flatten(mixed(inputs)):
            assert keras.backend.standardize_dtype(leaf.dtype) == mixed_output_dtype, cls.__name__
        assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in mixed.weights)

    if run_training and layer.trainable_weights:
        model = _model_of(cls(**init_kwargs), inputs)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [to_numpy(w).copy() for w in model.trainable_weights]
        target = keras.tree.map_structure(lambda y: np.ones(tuple(y.shape), "float32"), model(inputs))
        history = model.fit(inputs, target, batch_size=_batch_size(inputs), epochs=1, verbose=0).history
        assert np.isfinite(history["loss"][0]), cls.__name__
        moved = [not np.array_equal(to_numpy(w), b) for w, b in zip(model.trainable_weights, before)]
        assert any(moved), f"{cls.__name__}: one fit step moved no weight"
    return layer


def run_backbone_test(cls, init_kwargs, inputs, expected_output_shape, tmp_path, **options):
    """`run_layer_test`, then the keras-hub preset round trip."""
    backbone = run_layer_test(cls, init_kwargs, inputs, expected_output_shape, tmp_path, **options)
    backbone.save_to_preset(str(tmp_path / "preset"))
    loaded = cls.from_preset(str(tmp_path / "preset"))
    assert type(loaded) is cls and loaded.get_config() == backbone.get_config()
    _same(loaded(inputs), backbone(inputs), "preset round trip")
    return backbone
