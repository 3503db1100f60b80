"""Tasks: fit, router metrics, presets, .keras files, mixed precision."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import VMoEImageClassifierPreprocessor
from keras_vmoe.models import VMoEImageConverter
from tests.helpers import f32_atol
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy


def build(family, **overrides):
    keras.utils.set_random_seed(0)
    if family == "vmoe":
        arguments = tiny_vit_arguments(moe_layers=(1,), num_experts=4, num_selected_experts=2)
        arguments.update(overrides)
        return VMoEImageClassifier(VMoEBackbone(**arguments), num_classes=4)
    if family == "soft_moe":
        arguments = tiny_vit_arguments(moe_layers=(1,), num_experts=4, slots_per_expert=4)
        arguments.update(overrides)
        return SoftMoEImageClassifier(SoftMoEBackbone(**arguments), num_classes=4)
    arguments = tiny_vit_arguments(**overrides)
    return VMoEImageClassifier(VMoEBackbone(**arguments), num_classes=4)


def tiny_data(count=16):
    rng = np.random.RandomState(1)
    return rng.uniform(-1, 1, (count, 32, 32, 3)).astype("float32"), rng.randint(0, 4, count)


@pytest.mark.parametrize("family", ["vmoe", "soft_moe", "dense"])
def test_fit_lowers_the_loss(family):
    model = build(family)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    images, labels = tiny_data()
    history = model.fit(images, labels, batch_size=8, epochs=8, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    if family == "vmoe":
        assert {"moe_auxiliary_loss", "moe_dropped_tokens"} <= set(history)
        assert all(value > 0 for value in history["moe_auxiliary_loss"])
    if family == "soft_moe":
        assert "moe_auxiliary_loss" in history and "moe_dropped_tokens" not in history
    if family == "dense":
        assert "moe_auxiliary_loss" not in history


STUDY_ROUTERS = [
    "sinkhorn_token_choice",
    "sinkhorn_expert_choice",
    "sparse_token_choice",
    "sparse_expert_choice",
    "sparse_top_k",
]


@pytest.mark.parametrize("router", STUDY_ROUTERS)
def test_fit_lowers_the_loss_with_every_router(router, tmp_path):
    kwargs = dict(router=router, capacity_factor=2.0 if "expert" in router else 1.0)
    if "expert" in router:
        kwargs["num_selected_experts"] = 1
    model = build("vmoe", **kwargs)
    assert type(model.backbone.moe_blocks[0].router).__name__.lower().startswith(router.split("_")[0])
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    images, labels = tiny_data()
    history = model.fit(images, labels, batch_size=8, epochs=8, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert {"moe_auxiliary_loss", "moe_dropped_tokens"} <= set(history)
    assert all(np.isfinite(history["moe_auxiliary_loss"]))
    if router in ("sinkhorn_token_choice", "sparse_top_k"):  # Importance and load losses.
        assert all(value > 0 for value in history["moe_auxiliary_loss"])
    # Saved and loaded as a preset, it predicts the same.
    model.save_to_preset(str(tmp_path / "preset"))
    loaded = VMoEImageClassifier.from_preset(str(tmp_path / "preset"))
    assert type(loaded.backbone.moe_blocks[0].router) is type(model.backbone.moe_blocks[0].router)
    images = random_images(2)
    np.testing.assert_allclose(to_numpy(loaded(images)), to_numpy(model(images)), atol=1e-5)


@pytest.mark.parametrize("router", STUDY_ROUTERS)
def test_every_router_routes_in_float32_under_mixed_bfloat16(router):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = build("vmoe", router=router, num_selected_experts=1)
    moe = model.backbone.moe_blocks[0]
    tokens = keras.ops.cast(keras.ops.ones((2, 16, 32)), "bfloat16")
    plan, metrics = moe.router(tokens)
    assert moe.compute_dtype == "bfloat16" and moe.router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(plan.combine_weights.dtype) == "float32"
    assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in metrics.values())
    logits = model(random_images(2), training=True)
    assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"


def test_training_loss_includes_the_auxiliary_losses():
    # Without routing noise or dropout, a training forward pass equals the
    # eval one, so the training loss must be cross-entropy + auxiliary losses.
    model = build("vmoe", moe_layers=(0, 1), router_options=dict(noise_std=0.0, importance_loss_weight=0.5))
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    images, labels = tiny_data(8)
    logits = model(images, training=True)
    auxiliary = float(sum(to_numpy(loss) for loss in model.losses))
    assert auxiliary > 0 and len(model.losses) == 2
    cross_entropy = float(
        to_numpy(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)).mean()
    )
    loss = model.train_on_batch(images, labels, return_dict=True)["loss"]
    np.testing.assert_allclose(loss, cross_entropy + auxiliary, rtol=1e-5)


def test_eval_adds_no_auxiliary_loss():
    model = build("vmoe")
    model(random_images(2), training=False)
    assert model.losses == []


def test_predict_on_raw_images_goes_through_the_preprocessor():
    model = build("vmoe")
    model.preprocessor = VMoEImageClassifierPreprocessor(
        VMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    )
    raw = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype("uint8")
    expected = to_numpy(model(raw.astype("float32") / 127.5 - 1.0, training=False))
    # x * (1 / 127.5) - 1 in the converter, x / 127.5 - 1 here: 1-ulp pixel differences.
    np.testing.assert_allclose(model.predict(raw, verbose=0), expected, atol=f32_atol(expected))


def test_classifier_rejects_a_backbone_without_pooling():
    with pytest.raises(ValueError, match="pooling"):
        VMoEImageClassifier(VMoEBackbone(**tiny_vit_arguments(pooling=None)), num_classes=3)


@pytest.mark.parametrize("family", ["vmoe", "soft_moe"])
def test_preset_round_trip_and_keras_hub_loader(tmp_path, family):
    model = build(family)
    model.preprocessor = VMoEImageClassifierPreprocessor(
        VMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    )
    images = random_images(2)
    expected = to_numpy(model(images))
    model.save_to_preset(str(tmp_path / "preset"))
    loaded = type(model).from_preset(str(tmp_path / "preset"))
    np.testing.assert_allclose(to_numpy(loaded(images)), expected, atol=1e-6)
    # keras-hub's own generic loader finds our registered classes.
    generic = keras_hub.models.ImageClassifier.from_preset(str(tmp_path / "preset"))
    assert type(generic) is type(model)
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset"))
    assert type(backbone) is type(model.backbone)


@pytest.mark.parametrize("family", ["vmoe", "soft_moe"])
def test_keras_file_round_trip_in_safe_mode(tmp_path, family):
    model = build(family)
    images = random_images(2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(to_numpy(loaded(images)), to_numpy(model(images)), atol=1e-6)


@pytest.mark.parametrize("family", ["vmoe", "soft_moe"])
def test_mixed_bfloat16_policy_runs_with_float32_routing(family):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = build(family)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, labels = tiny_data(8)
    logits = model(images)
    assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
    moe = model.backbone.moe_blocks[0]
    assert moe.compute_dtype == "bfloat16" and moe.router.compute_dtype == "float32"
    tokens = keras.ops.cast(keras.ops.ones((2, 16, 32)), "bfloat16")
    if family == "vmoe":
        assert keras.backend.standardize_dtype(moe.router.gate_logits(tokens).dtype) == "float32"
    _, metrics = moe.router(tokens)
    assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in metrics.values())
    history = model.fit(images, labels, batch_size=4, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
