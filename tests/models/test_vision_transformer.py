"""The one encoder: shapes for every option, config round trips, argument errors."""

import numpy as np
import pytest

from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import every_n
from keras_vmoe.models import last_n
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy


@pytest.mark.parametrize(
    "pooling,use_class_token,expected",
    [
        (None, True, (2, 17, 32)),
        (None, False, (2, 16, 32)),
        ("token", None, (2, 32)),
        ("gap", None, (2, 32)),
        ("gap", True, (2, 32)),
        ("map", None, (2, 32)),
    ],
)
def test_output_shape_for_each_pooling(pooling, use_class_token, expected):
    backbone = VMoEBackbone(**tiny_vit_arguments(pooling=pooling, use_class_token=use_class_token))
    assert tuple(backbone(random_images(2)).shape) == expected


@pytest.mark.parametrize("position_embedding", ["learned", "sincos2d", None])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_position_embeddings_and_qk_norm(position_embedding, qk_norm):
    backbone = VMoEBackbone(
        **tiny_vit_arguments(
            position_embedding=position_embedding, attention_qk_norm=qk_norm, representation_size=8
        )
    )
    outputs = to_numpy(backbone(random_images(2)))
    assert outputs.shape == (2, 8)
    assert np.all(np.abs(outputs) <= 1.0)  # tanh pre-logits
    attention = backbone.encoder_blocks[0].attention
    assert hasattr(attention, "query_norm") == qk_norm


def test_sincos2d_embedding_follows_vmoe_formula():
    from keras_vmoe.layers.embedding import sincos2d_position_embedding

    table = sincos2d_position_embedding((2, 3), 8)
    # Position (row 1, column 2): omega = [1, 1e-4]; x = 2, y = 1.
    omega = np.array([1.0, 1e-4])
    expected = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)])
    np.testing.assert_allclose(table[5], expected, rtol=1e-6)


def test_moe_placements_follow_vmoe_configs():
    assert every_n(2, 8) == (1, 3, 5, 7)
    assert last_n(2, 8) == (5, 7)
    assert last_n(5, 12) == (1, 3, 5, 7, 9, 11)[-5:]


def test_named_architectures():
    config = VMoEBackbone.from_architecture("vmoe_s32_last2_e8_k2", image_shape=(64, 64, 3))
    assert (config.num_layers, config.hidden_dim, config.mlp_dim, config.num_heads) == (8, 512, 2048, 8)
    assert config.moe_layers == (5, 7) and config.num_experts == 8
    assert config.num_selected_experts == 2 and config.group_size == 8 * 5
    with pytest.raises(ValueError, match="Unknown V-MoE architecture"):
        VMoEBackbone.from_architecture("vmoe_q99")


@pytest.mark.parametrize("family", ["vmoe", "soft_moe", "dense"])
def test_get_config_round_trip_rebuilds_the_same_function(family):
    if family == "vmoe":
        backbone = VMoEBackbone(**tiny_vit_arguments(moe_layers=(1,), num_experts=4, num_selected_experts=2))
    elif family == "soft_moe":
        backbone = SoftMoEBackbone(**tiny_vit_arguments(moe_layers=(0, 1), num_experts=4, slots_per_expert=2))
    else:
        backbone = VMoEBackbone(**tiny_vit_arguments(pooling="map"))
    config = backbone.get_config()
    clone = type(backbone).from_config(config)
    assert clone.get_config() == config
    clone.set_weights(backbone.get_weights())
    images = random_images(2)
    np.testing.assert_allclose(to_numpy(clone(images)), to_numpy(backbone(images)), atol=1e-6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(patch_size=5), "does not divide"),
        (dict(image_shape=(32, 32)), "height, width, channels"),
        (dict(num_heads=3), "divisible by num_heads"),
        (dict(moe_layers=(2,), num_experts=4), "blocks 0 to 1"),
        (dict(moe_layers=(1, 1), num_experts=4), "repeats"),
        (dict(pooling="avg"), "pooling"),
        (dict(position_embedding="rope"), "position_embedding"),
        (dict(pooling="token", use_class_token=False), "class_token"),
        (dict(moe_layers=(1,), num_experts=2, num_selected_experts=3), "cannot exceed"),
        (dict(moe_layers=(1,), num_experts=2, capacity_factor=0.0), "capacity_factor"),
        (dict(moe_layers=(1,), num_experts=2, router="hash"), "unknown router"),
        (dict(num_layers=0), "num_layers"),
    ],
)
def test_bad_arguments_get_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        VMoEBackbone(**tiny_vit_arguments(**overrides))


def test_soft_moe_argument_errors():
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoEBackbone(**tiny_vit_arguments(moe_layers=(1,), num_experts=4, slots_per_expert=0))
    with pytest.raises(ValueError, match="either"):
        SoftMoEBackbone(**tiny_vit_arguments(moe_layers=(1,), num_experts=4, slots_per_expert=None))


def test_images_of_the_wrong_size_or_channels_are_rejected():
    backbone = VMoEBackbone(**tiny_vit_arguments())
    with pytest.raises(ValueError, match=r"expected shape=\(None, 32, 32, 3\)"):
        backbone(np.zeros((1, 64, 64, 3), "float32"))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        backbone(np.zeros((1, 32, 32, 1), "float32"))


def test_soft_moe_architectures_follow_the_paper():
    from keras_vmoe.models.soft_moe.soft_moe_architectures import architecture_config

    expected = {  # (num_layers, hidden, experts, MoE blocks)
        "soft_moe_s16": (12, 384, 128, tuple(range(6, 12))),
        "soft_moe_b16": (12, 768, 128, tuple(range(6, 12))),
        "soft_moe_l16": (24, 1024, 128, tuple(range(12, 24))),
        "soft_moe_s14": (12, 384, 256, tuple(range(6, 12))),
        "soft_moe_h14": (32, 1280, 256, tuple(range(16, 32))),
    }
    for name, (layers, hidden, experts, moe_layers) in expected.items():
        config = architecture_config(name)
        assert (config["num_layers"], config["hidden_dim"], config["num_experts"]) == (
            layers,
            hidden,
            experts,
        )
        assert config["moe_layers"] == moe_layers and config["slots_per_expert"] == 1
        assert config["pooling"] == "gap" and config["attention_qk_norm"]
    small = SoftMoEBackbone.from_architecture(
        "soft_moe_s16",
        image_shape=(32, 32, 3),
        num_layers=2,
        hidden_dim=32,
        mlp_dim=64,
        num_heads=2,
        moe_layers=(1,),
        num_experts=4,
    )
    assert tuple(small(random_images(1)).shape) == (1, 32)
    with pytest.raises(ValueError, match="Unknown Soft MoE architecture"):
        SoftMoEBackbone.from_architecture("soft_moe_x1")
