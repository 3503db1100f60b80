"""PaliGemma-style VLM with a V-MoE / Soft MoE image tower: training on captions,
generation, the auxiliary losses in the loss, presets, LoRA and bad input."""

import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe.models import PaliGemmaMoEBackbone
from keras_vmoe.models import PaliGemmaMoECausalLM
from keras_vmoe.models import PaliGemmaMoECausalLMPreprocessor
from tests.helpers import requires_coco_captions
from tests.helpers import to_numpy
from tests.models.pali_gemma_moe.tiny_pali_gemma import PROMPT
from tests.models.pali_gemma_moe.tiny_pali_gemma import coco_pairs
from tests.models.pali_gemma_moe.tiny_pali_gemma import random_uint8_images
from tests.models.pali_gemma_moe.tiny_pali_gemma import sentencepiece_proto
from tests.models.pali_gemma_moe.tiny_pali_gemma import tiny_causal_lm
from tests.models.pali_gemma_moe.tiny_pali_gemma import tiny_tower

TEXTS = ["a cat sits on a mat", "two dogs run on the grass", "a red bus on a street", PROMPT]


@pytest.fixture(scope="module")
def proto():
    return sentencepiece_proto(TEXTS)


def raw_inputs(count):
    """`count` 40x40 uint8 images (the model takes 32x32) with prompts and responses."""
    return {
        "images": random_uint8_images(count, size=40),
        "prompts": [PROMPT] * count,
        "responses": TEXTS[:count],
    }


@requires_coco_captions
@pytest.mark.parametrize("kind", ["soft", "vmoe"])
def test_fit_on_coco_captions_lowers_the_loss_and_generate_runs(kind):
    images, captions = coco_pairs(8)
    # One tower block (with the MoE) and one decoder block: fewer compilations.
    causal_lm = tiny_causal_lm(
        tiny_tower(kind, num_layers=1), sentencepiece_proto(captions + [PROMPT], 128), num_layers=1
    )
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    pairs = {"images": images, "prompts": [PROMPT] * len(images), "responses": captions}
    history = causal_lm.fit(pairs, epochs=6, batch_size=8, verbose=0).history
    losses = history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.75 * losses[0], losses
    # The tower's router losses are logged; V-MoE adds a positive auxiliary
    # loss (importance + load), Soft MoE none.
    auxiliary = np.asarray(history["moe_auxiliary_loss"])
    if kind == "vmoe":
        assert np.all(auxiliary > 0) and "moe_dropped_tokens" in history
    else:
        np.testing.assert_array_equal(auxiliary, 0.0)
    generated = causal_lm.generate({"images": images[:2], "prompts": [PROMPT] * 2}, max_length=12)
    assert len(generated) == 2
    for text in generated:
        assert text.startswith(PROMPT) and len(text.split()) <= 12


@pytest.fixture(scope="module")
def vmoe_lm(proto):
    """A V-MoE-tower VLM shared by the tests below (building one costs seconds
    on JAX). Without router noise, so that training and inference compute the
    same forward pass."""
    tower = tiny_tower("vmoe", router_options=dict(noise_std=0.0))
    return tiny_causal_lm(tower, proto, sequence_length=8)


def logits_of(causal_lm, x):
    """Logits on preprocessed `x`, through a compiled predict (eager JAX is slow)."""
    return to_numpy(PaliGemmaMoECausalLM(causal_lm.backbone).predict_on_batch(x))


def test_moe_auxiliary_losses_join_the_language_model_loss(vmoe_lm):
    x, y, sample_weight = vmoe_lm.preprocessor(raw_inputs(2))
    y, sample_weight = to_numpy(y), to_numpy(sample_weight)
    # Only the response tokens (and the end token) carry loss.
    np.testing.assert_array_equal(sample_weight[:, :-1], to_numpy(x["response_mask"])[:, 1:])
    logits = logits_of(vmoe_lm, x).astype("float64")
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    token_losses = -np.take_along_axis(log_probs, y[..., None].astype("int64"), axis=-1)[..., 0]
    language_model = (token_losses * sample_weight).sum() / token_losses.size  # Keras' mean.

    # One training step of the same model: the loss it reports (and
    # minimises) is the language-model loss plus the tower's auxiliary loss.
    task = PaliGemmaMoECausalLM(vmoe_lm.backbone)
    task.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = task.train_on_batch(x, y, sample_weight, return_dict=True)
    assert logs["moe_auxiliary_loss"] > 0 and "moe_dropped_tokens" in logs
    np.testing.assert_allclose(logs["loss"], language_model + logs["moe_auxiliary_loss"], rtol=1e-5)


def test_preset_round_trip_and_lora_fine_tuning(vmoe_lm, tmp_path):
    x, y, sample_weight = vmoe_lm.preprocessor(raw_inputs(2))
    logits = logits_of(vmoe_lm, x)
    vmoe_lm.save_to_preset(str(tmp_path))

    # keras-hub's own loader finds our classes in the folder.
    restored = keras_hub.models.CausalLM.from_preset(str(tmp_path))
    assert type(restored) is PaliGemmaMoECausalLM
    assert isinstance(restored.backbone, PaliGemmaMoEBackbone)
    assert restored.backbone.image_encoder.moe_layers == (1,)
    np.testing.assert_allclose(logits_of(restored, x), logits, atol=1e-6, rtol=0)
    restored_x = restored.preprocessor(raw_inputs(2))[0]  # The tokenizer and converter too.
    for key in x:
        np.testing.assert_array_equal(to_numpy(restored_x[key]), to_numpy(x[key]))

    # LoRA on the query / value projections of the decoder and of the tower:
    # only their LoRA factors (and the tower projections' biases, as Keras'
    # LoRA leaves a layer's bias trainable) train.
    restored.backbone.enable_lora(rank=2)
    tower_attention = [block.attention for block in restored.backbone.image_encoder.encoder_blocks]
    decoder_attention = [block.attention for block in restored.backbone.transformer_layers]
    lora_layers = [a.query for a in tower_attention] + [a.value for a in tower_attention]
    lora_layers += [a.query_dense for a in decoder_attention] + [a.value_dense for a in decoder_attention]
    assert all(layer.lora_enabled for layer in lora_layers)
    expected = {id(w) for layer in lora_layers for w in (layer.lora_kernel_a, layer.lora_kernel_b)}
    expected |= {id(layer.bias) for layer in lora_layers if layer.bias is not None}
    assert {id(w) for w in restored.trainable_weights} == expected
    frozen = {w.path: to_numpy(w) for w in restored.weights if id(w) not in expected}
    lora_b = [layer.lora_kernel_b for layer in lora_layers]
    assert all(np.all(to_numpy(w) == 0) for w in lora_b)  # LoRA starts as the identity.
    restored.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = restored.fit(raw_inputs(2), epochs=3, batch_size=2, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    for weight in restored.weights:
        if weight.path in frozen:
            np.testing.assert_array_equal(to_numpy(weight), frozen[weight.path], err_msg=weight.path)
    assert all(np.any(to_numpy(w) != 0) for w in lora_b)


def test_bad_inputs_get_clear_errors_or_documented_truncation(vmoe_lm):
    causal_lm, preprocessor = vmoe_lm, vmoe_lm.preprocessor

    # Prompts and images of different counts.
    inputs = raw_inputs(3)
    inputs["prompts"] = inputs["prompts"][:2]
    with pytest.raises(ValueError, match="3 images, 2 prompts, 3 responses"):
        preprocessor(inputs)
    with pytest.raises(ValueError, match="3 images, 2 prompts"):
        causal_lm.generate({"images": inputs["images"], "prompts": inputs["prompts"]})
    with pytest.raises(ValueError, match="keys \\['images', 'prompts', 'responses'\\]"):
        preprocessor({"images": inputs["images"], "prompts": inputs["prompts"]})
    # One unbatched image goes with one prompt.
    (single,) = causal_lm.generate({"images": inputs["images"][0], "prompts": [PROMPT]})
    assert single.startswith(PROMPT)

    # A prompt longer than the sequence: generate has no room left.
    long_prompt = " ".join(["a cat sits on a mat"] * 3)  # 18 tokens.
    with pytest.raises(ValueError, match="prompt 1 has 19 tokens .* sequence length is 8"):
        causal_lm.generate({"images": inputs["images"][:2], "prompts": [PROMPT, long_prompt]})
    # In training, prompt and response are truncated round-robin to the
    # sequence, and the loss stays on the response tokens that remain.
    x, y, sample_weight = preprocessor(
        {"images": inputs["images"][:1], "prompts": [long_prompt], "responses": ["two dogs"]}
    )
    token_ids = to_numpy(x["token_ids"])[0]
    response_ids = to_numpy(preprocessor.tokenizer("two dogs"))
    assert token_ids.shape == (8,) and np.all(to_numpy(x["padding_mask"]))
    # Inputs: <bos>, 5 of the 18 prompt tokens, the 2 response tokens; the
    # labels end with <eos>; the loss is on the 2 response tokens and <eos>.
    np.testing.assert_array_equal(token_ids[-2:], response_ids)
    np.testing.assert_array_equal(to_numpy(y)[0][-1], preprocessor.tokenizer.end_token_id)
    np.testing.assert_array_equal(to_numpy(sample_weight)[0], [0, 0, 0, 0, 0, 1, 1, 1])

    # Images of another size: the image converter resizes them; without
    # one, the model names the shape it expects.
    resized = preprocessor(raw_inputs(1))[0]["images"]
    assert tuple(resized.shape) == (1, 32, 32, 3)
    unconverted = PaliGemmaMoECausalLM(
        causal_lm.backbone,
        PaliGemmaMoECausalLMPreprocessor(preprocessor.tokenizer, None, sequence_length=8),
    )
    x = unconverted.preprocessor(raw_inputs(1))[0]
    x["images"] = keras.ops.convert_to_tensor(to_numpy(x["images"]).astype("float32"))
    with pytest.raises(ValueError, match=r"expected shape=\(None, 32, 32, 3\), found shape=\(1, 40, 40, 3\)"):
        unconverted(x)
    with pytest.raises(ValueError, match=r"expected shape=\(None, 32, 32, 3\)"):
        unconverted.generate({"images": raw_inputs(1)["images"], "prompts": [PROMPT]})
