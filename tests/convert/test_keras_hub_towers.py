"""External reference: keras-hub's SigLIP / SigLIP 2 vision towers and DINOv2
backbones, saved as presets, convert into our encoder with the same outputs.

keras-hub 0.32 builds SigLIP 2 presets with the SigLIP classes (a
`SigLIPBackbone` holding a `SigLIPVisionEncoder`), so "SigLIP 2" here is that
preset form; "SigLIP" is a vision encoder saved on its own.
"""

import json
import pathlib

import keras
import keras_hub
import numpy as np
import pytest

import keras_vmoe
from keras_vmoe.convert import CheckpointError
from keras_vmoe.convert import from_keras_hub
from keras_vmoe.convert import from_keras_hub_dinov2
from keras_vmoe.convert import from_keras_hub_siglip
from keras_vmoe.models import VMoEBackbone
from tests.helpers import f32_atol
from tests.helpers import random_images
from tests.helpers import to_numpy

NUM_EXPERTS = 4
IMAGES = random_images(3)  # (3, 32, 32, 3) in [0, 1).


def perturbed(model, seed):
    """Every float weight moved away from its initialiser (biases 0, norms
    1, LayerScale 1e-5), so that a missed or transposed weight shows."""
    rng = np.random.RandomState(seed)
    for weight in model.weights:
        if "int" not in str(weight.dtype):  # SigLIP's position_ids.
            weight.assign(to_numpy(weight) + rng.normal(0, 0.05, weight.shape).astype("float32"))
    return model


def saved(model, tmp_path_factory, name):
    folder = tmp_path_factory.mktemp(name)
    model.save_to_preset(str(folder))
    return str(folder)


def siglip_vision(**overrides):
    arguments = dict(
        patch_size=8, hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64, image_shape=(32, 32, 3)
    )
    return keras_hub.models.SigLIPVisionEncoder(**{**arguments, **overrides})


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """(keras-hub encoder reloaded from its preset, the preset folder)."""
    keras.utils.set_random_seed(0)
    folder = saved(perturbed(siglip_vision(), 1), tmp_path_factory, "siglip")
    return keras_hub.models.Backbone.from_preset(folder), folder


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
    """A SigLIPBackbone (vision and text towers), as SigLIP 2 presets are."""
    keras.utils.set_random_seed(0)
    vision = siglip_vision(patch_size=4, num_layers=1, intermediate_dim=48)
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=10,
        embedding_dim=32,
        hidden_dim=32,
        num_layers=1,
        num_heads=2,
        intermediate_dim=16,
        max_sequence_length=4,
    )
    folder = saved(perturbed(keras_hub.models.SigLIPBackbone(vision, text), 2), tmp_path_factory, "siglip2")
    return keras_hub.models.Backbone.from_preset(folder), folder


def dinov2(**overrides):
    arguments = dict(
        patch_size=8,
        num_layers=2,
        hidden_dim=32,
        num_heads=2,
        intermediate_dim=64,
        image_shape=(32, 32, 3),
        position_embedding_shape=(48, 48, 3),
        layer_scale_init_value=1e-5,
    )
    return keras_hub.models.DINOV2Backbone(**{**arguments, **overrides})


@pytest.fixture(scope="module")
def dino_registers(tmp_path_factory):
    """As `dinov2_with_registers_*`: registers, antialiased resizing, a
    position grid trained at another size (48 px) than the model's (32 px).
    Saving back-resizes the table, so the reference is the reloaded model."""
    keras.utils.set_random_seed(0)
    model = perturbed(dinov2(num_register_tokens=2, antialias_in_interpolation=True), 3)
    folder = saved(model, tmp_path_factory, "dinov2_registers")
    return keras_hub.models.Backbone.from_preset(folder), folder


def text_backbone():
    """A tiny text model: a preset of another family for the vision converters."""
    return keras_hub.models.BertBackbone(
        vocabulary_size=10,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=4,
    )


def assert_close(got, expected):
    assert got.shape == expected.shape
    # Two programs (keras' MultiHeadAttention, our einsums): float32 sums in
    # other orders.
    np.testing.assert_allclose(got, expected, atol=f32_atol(expected), rtol=0)


def test_siglip_preset_pooled_and_tokens(siglip):
    reference, folder = siglip
    pooled = from_keras_hub_siglip(folder)
    assert isinstance(pooled, VMoEBackbone) and pooled.pooling == "map" and not pooled.use_class_token
    assert_close(to_numpy(pooled(IMAGES)), to_numpy(reference({"images": IMAGES})))
    tokens = from_keras_hub_siglip(reference, pooling=None)
    reference_tokens = keras.Model(reference.input, reference.post_layer_norm.output)
    assert_close(to_numpy(tokens(IMAGES)), to_numpy(reference_tokens({"images": IMAGES})))


def test_siglip2_preset_vision_tower(siglip2):
    reference, folder = siglip2
    converted = from_keras_hub_siglip(folder)
    assert converted.patch_size == (4, 4) and converted.num_layers == 1
    assert_close(to_numpy(converted(IMAGES)), to_numpy(reference.vision_encoder({"images": IMAGES})))


def test_dinov2_with_registers_preset_tokens_and_poolings(dino_registers):
    reference, folder = dino_registers
    converted = from_keras_hub_dinov2(folder)
    assert converted.num_register_tokens == 2 and converted.num_prefix_tokens == 3
    expected = to_numpy(reference({"images": IMAGES}))  # (3, 1 + 2 + 16, 32)
    assert_close(to_numpy(converted(IMAGES)), expected)
    assert_close(to_numpy(from_keras_hub_dinov2(reference, pooling="token")(IMAGES)), expected[:, 0])
    assert_close(to_numpy(from_keras_hub_dinov2(reference, pooling="gap")(IMAGES)), expected[:, 3:].mean(1))


def test_dinov2_at_another_image_size_resizes_as_keras_hub(dino_registers):
    reference, folder = dino_registers
    images = random_images(2, (48, 48, 3))
    expected = to_numpy(
        keras_hub.models.DINOV2Backbone.from_preset(folder, image_shape=(48, 48, 3))({"images": images})
    )
    from_folder = from_keras_hub_dinov2(folder, image_shape=(48, 48, 3))
    from_model = from_keras_hub_dinov2(reference, image_shape=(48, 48, 3))
    assert from_folder.image_shape == (48, 48, 3)
    assert_close(to_numpy(from_folder(images)), expected)
    assert_close(to_numpy(from_model(images)), expected)


def test_dinov2_without_registers():
    keras.utils.set_random_seed(0)
    # Trained and used at one size: the table is copied as is.
    reference = perturbed(dinov2(image_shape=(32, 32, 3), position_embedding_shape=(32, 32, 3)), 4)
    converted = from_keras_hub_dinov2(reference)
    assert converted.num_register_tokens == 0 and "register_tokens" not in [
        layer.name for layer in converted.layers
    ]
    assert_close(to_numpy(converted(IMAGES)), to_numpy(reference({"images": IMAGES})))


@pytest.mark.parametrize("tower", ["siglip", "dino_registers"])
def test_upcycled_with_every_expert_gives_the_dense_outputs(tower, request):
    reference, folder = request.getfixturevalue(tower)
    dense = from_keras_hub_siglip(folder) if tower == "siglip" else from_keras_hub_dinov2(folder)
    # K = E and capacity for every token: the gates sum to 1 over E copies.
    moe = keras_vmoe.upcycle(dense, NUM_EXPERTS, (1,), num_selected_experts=NUM_EXPERTS, capacity_factor=1.0)
    assert moe.moe_layers == (1,) and moe.num_register_tokens == dense.num_register_tokens
    expected = to_numpy(dense(IMAGES))
    assert_close(to_numpy(moe(IMAGES)), expected)


def test_a_preset_of_another_family_is_refused_before_loading(tmp_path, siglip):
    text = text_backbone()
    text.save_to_preset(str(tmp_path / "bert"))
    with pytest.raises(
        ValueError, match=r"is a BertBackbone preset; expected a SigLIPBackbone or SigLIPVisionEncoder"
    ):
        from_keras_hub_siglip(str(tmp_path / "bert"))
    with pytest.raises(
        ValueError, match=r"is a SigLIPVisionEncoder preset; expected a DINOV2Backbone preset"
    ):
        from_keras_hub_dinov2(siglip[1])
    with pytest.raises(
        ValueError, match="expected a keras-hub DINOV2Backbone or a preset of one, got BertBackbone"
    ):
        from_keras_hub_dinov2(text)


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder; expected a keras-hub preset folder"):
        from_keras_hub_siglip(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="has no config.json; expected a keras-hub preset folder"):
        from_keras_hub_dinov2(str(tmp_path))


def test_unconvertible_options_are_named():
    with pytest.raises(ValueError, match="SwiGLU MLP"):
        from_keras_hub_dinov2(dinov2(use_swiglu_ffn=True))
    with pytest.raises(ValueError, match="only layer_norm_epsilon=1e-06 converts"):
        from_keras_hub_siglip(siglip_vision(layer_norm_epsilon=1e-5))
    with pytest.raises(ValueError, match="pooling must be 'map' or None"):
        from_keras_hub_siglip(siglip_vision(), pooling="token")


def test_from_keras_hub_picks_the_converter_from_a_path_or_a_model(siglip, dino_registers):
    reference, folder = siglip
    assert_close(
        to_numpy(from_keras_hub(pathlib.Path(folder))(IMAGES)), to_numpy(reference({"images": IMAGES}))
    )
    dino, _ = dino_registers
    assert from_keras_hub(dino, pooling="token").pooling == "token"


class SubclassedViT(keras_hub.models.ViTBackbone):
    """A user's subclass of a keras-hub class converts as its parent does."""


def test_a_subclass_of_a_keras_hub_class_and_our_own_models(tmp_path):
    vit = SubclassedViT(
        image_shape=(16, 16, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )
    converted = from_keras_hub(vit)
    assert isinstance(converted, VMoEBackbone)
    with pytest.raises(ValueError, match="expects a keras-hub model or preset, got VMoEBackbone"):
        from_keras_hub(converted)


@pytest.mark.parametrize(
    "model_type, found", [("dinov2_with_registers", "DINOV2Backbone"), ("vit", "ViTBackbone"), ("bert", None)]
)
def test_hugging_face_checkpoints_are_told_by_their_model_type(tmp_path, model_type, found):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if found:
        assert keras_vmoe.convert.keras_hub_source.preset_class_name(str(tmp_path)) == found
    else:
        with pytest.raises(
            ValueError, match="is a Hugging Face 'bert' model preset; the keras-hub models that"
        ):
            from_keras_hub(str(tmp_path))
