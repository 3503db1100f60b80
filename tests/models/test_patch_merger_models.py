"""PatchMerger inside the encoder, for every family: shapes, gradients, class
token, MoE groups after the merger, training, saving, named architectures, errors."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import PatchMerger
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models.vmoe.vmoe_architectures import VMOE_ARCHITECTURES
from keras_vmoe.models.vmoe.vmoe_architectures import architecture_config
from tests.helpers import gradients
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy

FAMILIES = ["dense", "vmoe", "soft_moe"]


def backbone_for(family, after_block=1, num_tokens=4, **overrides):
    """A 4-block tiny backbone (16 patches) of `family` with a PatchMerger;
    the MoE layers sit before and after the merger."""
    keras.utils.set_random_seed(0)
    arguments = tiny_vit_arguments(
        num_layers=4, patch_merger=dict(after_block=after_block, num_tokens=num_tokens)
    )
    if family == "vmoe":
        arguments.update(moe_layers=(1, 3), num_experts=4, num_selected_experts=2)
    elif family == "soft_moe":
        arguments.update(moe_layers=(1, 3), num_experts=4, slots_per_expert=2)
    arguments.update(overrides)
    cls = SoftMoEBackbone if family == "soft_moe" else VMoEBackbone
    return cls(**arguments)


def token_counts(backbone):
    """Tokens per image each encoder block sees."""
    return [block.output.shape[1] for block in backbone.encoder_blocks]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("after_block", [0, 1, 2])
def test_blocks_after_the_merger_see_the_merged_tokens(family, after_block):
    backbone = backbone_for(family, after_block=after_block, num_tokens=4, pooling=None, use_class_token=True)
    expected = [17 if index <= after_block else 5 for index in range(4)]
    assert token_counts(backbone) == expected
    outputs = to_numpy(backbone(random_images(2)))
    assert outputs.shape == (2, 5, 32) and np.all(np.isfinite(outputs))
    merger = backbone.patch_merger_layer
    assert isinstance(merger, PatchMerger) and merger.num_prefix_tokens == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["token", "gap", "map"])
def test_every_pooling_works_after_the_merger(family, pooling):
    backbone = backbone_for(family, pooling=pooling)
    assert tuple(backbone(random_images(2)).shape) == (2, 32)


def test_without_class_token_all_tokens_are_merged():
    backbone = backbone_for("dense", pooling="gap", use_class_token=False)
    assert token_counts(backbone) == [16, 16, 4, 4]
    assert backbone.patch_merger_layer.num_prefix_tokens == 0


def test_class_token_passes_the_merger_unmerged():
    backbone = backbone_for("vmoe", pooling="token")
    probe = keras.Model(
        backbone.input,
        [backbone.get_layer("encoder_block_1").output, backbone.get_layer("patch_merger").output],
    )
    before, after = (to_numpy(t) for t in probe(random_images(2)))
    assert before.shape == (2, 17, 32) and after.shape == (2, 5, 32)
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
    merger = backbone.patch_merger_layer
    weights = to_numpy(merger.merge_weights(before))
    assert weights.shape == (2, 4, 16)  # the merge weights cover the 16 patches only
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_weight_and_pixel(family):
    # In inference mode: no routing noise, no dropout.
    backbone = backbone_for(family, pooling="token")
    weight_grads, input_grad = gradients(backbone, random_images(2))
    assert len(weight_grads) == len(backbone.trainable_variables)
    for grad, variable in zip(weight_grads, backbone.trainable_variables):
        assert grad is not None and grad.shape == tuple(variable.shape), variable.path
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0, variable.path
    names = [v.path for v in backbone.trainable_variables]
    assert any(name.startswith("patch_merger/") for name in names)
    assert input_grad.shape == (2, 32, 32, 3) and np.abs(input_grad).max() > 0


def test_sparse_moe_groups_keep_their_number_of_images_after_the_merger():
    # group_size=34: 2 images of 17 tokens before the merger, 2 images of
    # 1 + 4 tokens after it.
    backbone = backbone_for("vmoe", group_size=34)
    assert [moe.group_size for moe in backbone.moe_blocks] == [34, 10]
    assert backbone.get_config()["group_size"] == 34
    assert tuple(backbone(random_images(2)).shape) == (2, 32)
    with pytest.raises(ValueError, match="whole number of images, a multiple of the 17 tokens"):
        backbone_for("vmoe", group_size=8)
    # MoE layers before the merger only: any group size.
    only_before = backbone_for("vmoe", after_block=2, moe_layers=(0, 1), group_size=8)
    assert [moe.group_size for moe in only_before.moe_blocks] == [8, 8]


def test_soft_moe_slots_follow_the_merged_tokens():
    backbone = backbone_for("soft_moe", slots_per_expert=None, capacity_factor=1.0)
    # round(17 tokens / 4 experts) = 4 slots before, round(5 / 4) = 1 after.
    assert [moe.router.slots_per_expert for moe in backbone.moe_blocks] == [4, 1]
    fixed = backbone_for("soft_moe", slots_per_expert=3)
    assert [moe.router.slots_per_expert for moe in fixed.moe_blocks] == [3, 3]
    assert tuple(fixed(random_images(2)).shape) == (2, 32)


def build_classifier(family, **overrides):
    backbone = backbone_for(family, **overrides)
    cls = SoftMoEImageClassifier if family == "soft_moe" else VMoEImageClassifier
    return cls(backbone, num_classes=4)


def test_fit_lowers_the_loss_with_a_patch_merger():
    # V-MoE, the paper's pairing; every family's gradients are checked above.
    model = build_classifier("vmoe")
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    rng = np.random.RandomState(1)
    images, labels = rng.uniform(-1, 1, (16, 32, 32, 3)).astype("float32"), rng.randint(0, 4, 16)
    kernel_before = to_numpy(model.backbone.patch_merger_layer.kernel)
    history = model.fit(images, labels, batch_size=8, epochs=8, verbose=0).history
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    assert np.abs(to_numpy(model.backbone.patch_merger_layer.kernel) - kernel_before).max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip_keeps_the_patch_merger_and_the_outputs(family):
    backbone = backbone_for(family)
    config = backbone.get_config()
    assert config["patch_merger"] == {"after_block": 1, "num_tokens": 4}
    clone = type(backbone).from_config(config)
    assert clone.get_config() == config
    clone.set_weights(backbone.get_weights())
    images = random_images(2)
    np.testing.assert_allclose(to_numpy(clone(images)), to_numpy(backbone(images)), atol=1e-6)


def test_preset_round_trip_keeps_the_outputs(tmp_path):
    model = build_classifier("vmoe")
    images = random_images(2)
    expected = to_numpy(model(images))
    model.save_to_preset(str(tmp_path / "preset"))
    loaded = VMoEImageClassifier.from_preset(str(tmp_path / "preset"))
    assert loaded.backbone.patch_merger == {"after_block": 1, "num_tokens": 4}
    np.testing.assert_allclose(to_numpy(loaded(images)), expected, atol=1e-6)


def test_keras_file_round_trip_in_safe_mode(tmp_path):
    model = build_classifier("soft_moe", pooling="gap")
    images = random_images(2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.backbone.patch_merger_layer, PatchMerger)
    np.testing.assert_allclose(to_numpy(loaded(images)), to_numpy(model(images)), atol=1e-6)


@pytest.mark.parametrize(
    "patch_merger,message",
    [
        (dict(after_block=3, num_tokens=4), "after_block=3, but the encoder has blocks 0 to 3"),
        (dict(after_block=4, num_tokens=4), "after_block must be in 0 to 2"),
        (dict(after_block=-1, num_tokens=4), "after_block=-1"),
        (dict(after_block=1.5, num_tokens=4), "after_block` must be an integer"),
        (dict(after_block=1, num_tokens=0), "num_tokens` must be >= 1, got 0"),
        (dict(after_block=1, num_tokens=17), "num_tokens=17 is more than the 16 patch tokens"),
        (dict(after_block=1), "got the keys \\['after_block'\\]"),
        (dict(after_block=1, num_tokens=4, tokens=2), "after_block=<block index>, num_tokens=<tokens out>"),
        ((1, 4), "must be None or a dict"),
    ],
)
def test_bad_patch_merger_arguments_get_clear_errors(patch_merger, message):
    with pytest.raises(ValueError, match=message):
        VMoEBackbone(**tiny_vit_arguments(num_layers=4, patch_merger=patch_merger))


def test_a_one_block_encoder_has_no_place_for_a_merger():
    with pytest.raises(ValueError, match="needs num_layers >= 2, since at least one block must follow"):
        VMoEBackbone(**tiny_vit_arguments(num_layers=1, patch_merger=dict(after_block=0, num_tokens=4)))


def test_named_patch_merger_architectures():
    for name in ("vit_b16_pm8", "vmoe_b16_every2_e8_k2_pm8", "vit_l16_pm8", "vmoe_s32_every2_e32_k1_pm8"):
        assert name in VMOE_ARCHITECTURES
    config = architecture_config("vit_b16_pm8")
    assert config["patch_merger"] == dict(after_block=5, num_tokens=8)
    assert config.get("moe_layers", ()) == () and config["pooling"] == "token"
    config = architecture_config("vmoe_b16_every2_e8_k2_pm8")
    assert config["patch_merger"] == dict(after_block=5, num_tokens=8)
    assert config["moe_layers"] == (1, 3, 5, 7, 9, 11) and config["group_size"] == 8 * 197
    assert architecture_config("vit_l16_pm8")["patch_merger"] == dict(after_block=11, num_tokens=8)
    assert architecture_config("vit_h14_pm8")["patch_merger"] == dict(after_block=15, num_tokens=8)
    assert "patch_merger" not in architecture_config("vit_b16")
    for name in VMOE_ARCHITECTURES:  # Every listed name parses.
        architecture_config(name)
    with pytest.raises(ValueError, match="Unknown V-MoE architecture"):
        architecture_config("vmoe_b16_last2_e8_k2_pm8")


def test_named_v_moe_with_patch_merger_builds():
    # V-MoE-B/16 with PatchMerger, shrunk in width and image size (12 blocks
    # kept): 8 images per routing group before and after the merger.
    backbone = VMoEBackbone.from_architecture(
        "vmoe_b16_every2_e8_k2_pm8",
        image_shape=(64, 64, 3),
        hidden_dim=32,
        mlp_dim=32,
        num_heads=2,
        num_experts=4,
        representation_size=32,
    )
    assert token_counts(backbone) == [17] * 6 + [9] * 6
    assert [moe.group_size for moe in backbone.moe_blocks] == [8 * 17] * 3 + [8 * 9] * 3
    assert tuple(backbone.output.shape) == (None, 32)
