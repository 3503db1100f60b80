"""Every public layer and backbone through the shared harness (`tests/harness.py`)."""

import keras
import numpy as np
import pytest

from keras_vmoe import layers
from keras_vmoe import models
from tests.harness import run_backbone_test
from tests.harness import run_layer_test
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments

B, T, D = 2, 16, 8
TOKENS = np.random.RandomState(0).randn(B, T, D).astype("float32")
MOE = dict(moe_layers=(1,), num_experts=4)

LAYERS = {
    "PatchEmbedding": (
        layers.PatchEmbedding,
        dict(hidden_dim=8, patch_size=(4, 4)),
        random_images(2, (8, 8, 3)),
        (2, 4, 8),
    ),
    "ClassToken": (layers.ClassToken, {}, TOKENS, (B, T + 1, D)),
    "RegisterTokens": (layers.RegisterTokens, dict(num_tokens=2, index=1), TOKENS, (B, T + 2, D)),
    "PositionEmbedding": (
        layers.PositionEmbedding,
        dict(kind="learned", grid_size=(4, 4)),
        TOKENS,
        (B, T, D),
    ),
    "MultiHeadDotProductAttention": (
        layers.MultiHeadDotProductAttention,
        dict(num_heads=2, qk_norm=True),
        TOKENS,
        (B, T, D),
    ),
    "Mlp": (layers.Mlp, dict(mlp_dim=16), TOKENS, (B, T, D)),
    # The block's MLP as its config holds it (each block built anew owns one).
    "EncoderBlock": (
        layers.EncoderBlock,
        dict(num_heads=2, mlp=keras.saving.serialize_keras_object(layers.Mlp(16, name="mlp"))),
        TOKENS,
        (B, T, D),
    ),
    "SequencePooling": (layers.SequencePooling, dict(mode="gap"), TOKENS, (B, D)),
    "MultiHeadAttentionPooling": (
        layers.MultiHeadAttentionPooling,
        dict(num_heads=2, mlp_dim=16),
        TOKENS,
        (B, D),
    ),
    "SparseMoE": (
        layers.SparseMoE,
        dict(num_experts=4, mlp_dim=16, num_selected_experts=2, capacity_factor=2.0),
        TOKENS,
        (B, T, D),
    ),
    "SparseMoE_sinkhorn": (
        layers.SparseMoE,
        dict(num_experts=4, mlp_dim=16, router="sinkhorn_expert_choice"),
        TOKENS,
        (B, T, D),
    ),
    "SoftMoE": (layers.SoftMoE, dict(num_experts=4, mlp_dim=16, slots_per_expert=2), TOKENS, (B, T, D)),
    "PatchMerger": (layers.PatchMerger, dict(num_tokens=4), TOKENS, (B, 4, D)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer(name, tmp_path):
    cls, kwargs, inputs, shape = LAYERS[name]
    run_layer_test(cls, kwargs, inputs, shape, tmp_path)


def limoe_inputs():
    rng = np.random.RandomState(1)
    return {
        "images": random_images(2, (16, 16, 3)),
        "token_ids": rng.randint(1, 50, (2, 6)).astype("int32"),
        "padding_mask": np.array([[1] * 6, [1] * 4 + [0] * 2], bool),
    }


def vlm_inputs():
    rng = np.random.RandomState(2)
    return {
        "images": random_images(2),
        "token_ids": rng.randint(1, 50, (2, 6)).astype("int32"),
        "padding_mask": np.ones((2, 6), "int32"),
        "response_mask": np.array([[0, 0, 0, 1, 1, 1]] * 2, "int32"),
    }


def vlm_arguments():
    tower = models.VMoEBackbone(**tiny_vit_arguments(pooling=None, use_class_token=False, **MOE))
    return dict(
        vocabulary_size=50,
        image_encoder=tower,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )


BACKBONES = {
    "VisionTransformerBackbone": (
        models.VisionTransformerBackbone,
        lambda: tiny_vit_arguments(),
        lambda: random_images(2),
        [(2, 32)],
        {},
    ),
    "VMoEBackbone": (
        models.VMoEBackbone,
        lambda: tiny_vit_arguments(num_selected_experts=2, **MOE),
        lambda: random_images(2),
        [(2, 32)],
        {},
    ),
    # DINOv2's options: registers (skipped by GAP), LayerScale.
    "VMoEBackbone with registers": (
        models.VMoEBackbone,
        lambda: tiny_vit_arguments(
            num_selected_experts=2, num_register_tokens=2, pooling="gap", layer_scale_init=0.1, **MOE
        ),
        lambda: random_images(2),
        [(2, 32)],
        {},
    ),
    "SoftMoEBackbone": (
        models.SoftMoEBackbone,
        lambda: tiny_vit_arguments(slots_per_expert=2, **MOE),
        lambda: random_images(2),
        [(2, 32)],
        {},
    ),
    "LIMoEBackbone": (
        models.LIMoEBackbone,
        lambda: dict(
            image_shape=(16, 16, 3),
            patch_size=4,
            vocabulary_size=50,
            max_text_length=6,
            num_layers=2,
            hidden_dim=16,
            mlp_dim=32,
            num_heads=2,
            embedding_dim=8,
            **MOE,
        ),
        limoe_inputs,
        [(2, 8), (2, 8)],
        dict(mixed_output_dtype="float32"),
    ),
    "PaliGemmaMoEBackbone": (models.PaliGemmaMoEBackbone, vlm_arguments, vlm_inputs, [(2, 22, 16)], {}),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone(name, tmp_path):
    cls, arguments, inputs, shapes, options = BACKBONES[name]
    run_backbone_test(cls, arguments(), inputs(), shapes, tmp_path, **options)
