"""PaliGemmaMoEBackbone: the tower it accepts, its shapes, and swapping the tower."""

import keras
import numpy as np
import pytest

from keras_vmoe.models import PaliGemmaMoEBackbone
from tests.helpers import to_numpy
from tests.models.pali_gemma_moe.tiny_pali_gemma import tiny_tower

DECODER = dict(
    vocabulary_size=20,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=32,
    intermediate_dim=64,
    head_dim=16,
)


def inputs(batch=2, length=8):
    return {
        "images": np.random.RandomState(0).uniform(-1, 1, (batch, 32, 32, 3)).astype("float32"),
        "token_ids": np.arange(batch * length, dtype="int32").reshape(batch, length) % 20,
        "padding_mask": np.ones((batch, length), "int32"),
        "response_mask": np.zeros((batch, length), "int32"),
    }


def test_image_tokens_prefix_the_text_and_the_tower_can_be_swapped():
    keras.utils.set_random_seed(0)
    backbone = PaliGemmaMoEBackbone(image_encoder=tiny_tower("dense"), **DECODER)
    assert backbone.image_sequence_length == 16 and backbone.image_shape == (32, 32, 3)
    outputs = to_numpy(backbone.predict_on_batch(inputs()))  # Compiled: faster than eager on JAX.
    assert outputs.shape == (2, 16 + 8, 32)
    # With a class token, 1 + 16 image tokens.
    with_class_token = backbone.with_image_encoder(tiny_tower("dense", use_class_token=True))
    assert with_class_token.image_sequence_length == 17

    # The same decoder and projection on another tower.
    other = tiny_tower("dense")
    swapped = backbone.with_image_encoder(other)
    assert swapped.image_encoder is other and swapped.image_sequence_length == 16
    for ours, theirs in (
        (swapped.token_embedding, backbone.token_embedding),
        (swapped.transformer_layers[1], backbone.transformer_layers[1]),
        (swapped.image_projection, backbone.image_projection),
    ):
        for a, b in zip(ours.weights, theirs.weights):
            assert a is not b
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # The text positions attend to the image tokens, so a new tower changes them.
    assert np.abs(to_numpy(swapped.predict_on_batch(inputs()))[:, 16:] - outputs[:, 16:]).max() > 1e-3
    with pytest.raises(ValueError, match="outputs width 16, but the image projection takes 32"):
        backbone.with_image_encoder(tiny_tower("dense", hidden_dim=16))


def test_bad_towers_and_decoder_sizes_are_named():
    with pytest.raises(ValueError, match="must be a keras_vmoe VisionTransformerBackbone.*got Dense"):
        PaliGemmaMoEBackbone(image_encoder=keras.layers.Dense(4), **DECODER)
    with pytest.raises(ValueError, match="needs pooling=None; it has pooling='gap'"):
        PaliGemmaMoEBackbone(image_encoder=tiny_tower("dense", pooling="gap"), **DECODER)
    tower = tiny_tower("dense")
    with pytest.raises(ValueError, match="num_query_heads=3 must be a multiple of num_key_value_heads=2"):
        PaliGemmaMoEBackbone(
            image_encoder=tower, **{**DECODER, "num_query_heads": 3, "num_key_value_heads": 2}
        )
    with pytest.raises(ValueError, match="`vocabulary_size` must be >= 1, got 0"):
        PaliGemmaMoEBackbone(image_encoder=tower, **{**DECODER, "vocabulary_size": 0})
