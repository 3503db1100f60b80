"""keras-hub PaliGemma -> PaliGemmaMoECausalLM: the same logits and greedy
generations, and the converted image tower upcycles to the same function."""

import keras
import keras_hub
import numpy as np
import pytest

import keras_vmoe
from keras_vmoe.convert import from_keras_hub_pali_gemma
from keras_vmoe.layers.moe import SparseMoE
from keras_vmoe.models import PaliGemmaMoEBackbone
from keras_vmoe.models import PaliGemmaMoECausalLM
from keras_vmoe.models import VMoEBackbone
from tests.helpers import f32_atol
from tests.helpers import to_numpy
from tests.models.pali_gemma_moe.tiny_pali_gemma import random_uint8_images
from tests.models.pali_gemma_moe.tiny_pali_gemma import sentencepiece_proto

TEXTS = ["a cat sits on a mat", "two dogs run on the grass", "caption en"]
PROMPTS = ["caption en", "two dogs"]
# With PaliGemma 2's Gemma 2 options, so that they convert too: post-norms,
# logit soft caps, local attention over 8 positions in every other block.
KERAS_HUB_BACKBONE = dict(
    image_size=16,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=16,
    intermediate_dim=32,
    head_dim=8,
    vit_patch_size=4,
    vit_num_layers=2,
    vit_num_heads=2,
    vit_hidden_dim=16,
    vit_intermediate_dim=32,
    query_head_dim_normalize=False,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    use_sliding_window_attention=True,
    sliding_window_size=8,
)


def tiny_keras_hub_pali_gemma():
    """A tiny keras-hub PaliGemmaCausalLM with random weights."""
    keras.utils.set_random_seed(0)
    tokenizer = keras_hub.models.PaliGemmaTokenizer(proto=sentencepiece_proto(TEXTS))
    preprocessor = keras_hub.models.PaliGemmaCausalLMPreprocessor(
        tokenizer,
        keras_hub.layers.PaliGemmaImageConverter(image_size=(16, 16), scale=1 / 127.5, offset=-1),
        sequence_length=12,
    )
    backbone = keras_hub.models.PaliGemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), **KERAS_HUB_BACKBONE
    )
    # Away from the initialisers' zeros and ones, so that a missed or
    # transposed weight shows.
    rng = np.random.RandomState(1)
    for weight in backbone.weights:
        weight.assign(to_numpy(weight) + rng.normal(0, 0.2, weight.shape).astype("float32"))
    return keras_hub.models.PaliGemmaCausalLM(preprocessor, backbone)


@pytest.fixture(scope="module")
def keras_hub_and_converted(tmp_path_factory):
    """The tiny keras-hub PaliGemma, saved as a preset, and our model
    converted from that folder."""
    reference = tiny_keras_hub_pali_gemma()
    folder = tmp_path_factory.mktemp("keras_hub_pali_gemma")
    reference.save_to_preset(str(folder))
    return reference, from_keras_hub_pali_gemma(str(folder))


def test_converted_preset_gives_keras_hub_logits_and_greedy_tokens(keras_hub_and_converted):
    reference, converted = keras_hub_and_converted
    assert isinstance(converted, PaliGemmaMoECausalLM)
    tower = converted.backbone.image_encoder
    # Copies of the weights, not the keras-hub variables themselves.
    assert converted.backbone.token_embedding.embeddings is not reference.backbone.token_embedding.embeddings
    assert isinstance(tower, VMoEBackbone) and tower.moe_layers == () and tower.pooling is None
    assert converted.backbone.image_sequence_length == reference.backbone.image_sequence_length == 16

    inputs = {
        "images": random_uint8_images(2, size=24),  # Resized to 16x16 by both.
        "prompts": PROMPTS,
        "responses": ["a cat sits", "on the grass"],
    }
    x, y, sample_weight = reference.preprocessor(inputs)
    ours = converted.preprocessor(inputs)
    for expected, actual in zip((x, y, sample_weight), ours):
        for key in expected if isinstance(expected, dict) else [None]:
            e, a = (expected[key], actual[key]) if key else (expected, actual)
            np.testing.assert_allclose(to_numpy(a), to_numpy(e), atol=1e-6, err_msg=str(key))
    # The image tokens at the decoder width, then the text logits.
    np.testing.assert_allclose(
        to_numpy(converted.backbone.embed_images(x["images"])),
        to_numpy(reference.backbone.vit_encoder(x["images"])),
        atol=1e-5,
        rtol=0,
    )
    expected, actual = to_numpy(reference(x)), to_numpy(converted(x))
    assert np.abs(expected).max() > 1.0  # Logits of a real scale, not all near zero.
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)

    # Greedy generation, token by token: 10 new tokens after the prompts.
    prompts = {"images": inputs["images"], "prompts": PROMPTS}
    packed = reference.preprocessor.generate_preprocess(prompts, sequence_length=12)
    expected_tokens = keras_hub.models.PaliGemmaCausalLM(None, reference.backbone).generate(
        packed, stop_token_ids=None
    )["token_ids"]
    actual_tokens = PaliGemmaMoECausalLM(converted.backbone).generate(packed, stop_token_ids=None)
    np.testing.assert_array_equal(to_numpy(actual_tokens["token_ids"]), to_numpy(expected_tokens))


def test_upcycled_tower_with_all_experts_computes_the_dense_vlm(keras_hub_and_converted):
    _, dense = keras_hub_and_converted
    x = dense.preprocessor(
        {"images": random_uint8_images(2, size=16), "prompts": PROMPTS, "responses": TEXTS[:2]}
    )[0]
    # K = E and capacity for every token: each token's output is its gates
    # (summing to 1) times 4 copies of the dense MLP.
    moe = keras_vmoe.upcycle(
        dense, num_experts=4, moe_layers=(0, 1), num_selected_experts=4, capacity_factor=1.0
    )
    assert isinstance(moe, PaliGemmaMoECausalLM) and moe.preprocessor is dense.preprocessor
    tower = moe.backbone.image_encoder
    assert isinstance(tower, VMoEBackbone) and tower.moe_layers == (0, 1)
    assert all(isinstance(block, SparseMoE) for block in tower.moe_blocks)
    expected = to_numpy(dense(x))
    np.testing.assert_allclose(to_numpy(moe(x)), expected, atol=f32_atol(expected), rtol=0)
    # The decoder is a copy, not the same variables.
    ours, theirs = moe.backbone.token_embedding.embeddings, dense.backbone.token_embedding.embeddings
    assert ours is not theirs
    np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))


def test_what_cannot_be_converted_is_named(keras_hub_and_converted):
    reference, converted = keras_hub_and_converted
    with pytest.raises(ValueError, match="expects a keras-hub PaliGemmaCausalLM.*got PaliGemmaMoECausalLM"):
        from_keras_hub_pali_gemma(converted)
    config = {**reference.backbone.get_config(), "vit_classifier_activation": "tanh"}
    with pytest.raises(ValueError, match="only a linear image projection.*'tanh'"):
        from_keras_hub_pali_gemma(keras_hub.models.PaliGemmaBackbone.from_config(config))
    # A backbone converts to a backbone.
    backbone = from_keras_hub_pali_gemma(reference.backbone)
    assert isinstance(backbone, PaliGemmaMoEBackbone)
    assert backbone.image_encoder.image_shape == (16, 16, 3)
