"""Preprocessing of `PaliGemmaMoECausalLM`: keras-hub's PaliGemma preprocessing,
with the checks a user needs on bad input."""

import keras
from keras_hub.models import PaliGemmaCausalLMPreprocessor

from keras_vmoe.keras_hub_internals import convert_to_numpy
from keras_vmoe.keras_hub_internals import in_tf_function
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_backbone import PaliGemmaMoEBackbone
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_image_converter import PaliGemmaMoEImageConverter
from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_tokenizer import PaliGemmaMoETokenizer
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin


def _num_examples(value, unbatched_rank):
    """How many examples `value` holds, or None when the batch is symbolic."""
    if isinstance(value, (str, bytes)):
        return 1
    if isinstance(value, (list, tuple)):
        return len(value)
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    if len(shape) == unbatched_rank:
        return 1
    return None if shape[0] is None else int(shape[0])


def _token_lists(token_ids):
    """Tokenizer output (ragged tf, a list, one sequence) as a list of lists."""
    if hasattr(token_ids, "to_list"):
        token_ids = token_ids.to_list()
    elif hasattr(token_ids, "numpy"):
        token_ids = token_ids.numpy().tolist()
    token_ids = list(token_ids)
    if token_ids and not isinstance(token_ids[0], (list, tuple)):
        token_ids = [token_ids]  # One unbatched prompt.
    return token_ids


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PaliGemmaMoECausalLMPreprocessor(BuiltinPresetMixin, PaliGemmaCausalLMPreprocessor):
    """Turns `{"images", "prompts", "responses"}` into `PaliGemmaMoECausalLM` inputs.

    As keras-hub's `PaliGemmaCausalLMPreprocessor`: the images go through the
    image converter (resized to the image tower's size, pixels scaled);
    `<bos> prompt response <eos>` is packed into `sequence_length + 1`
    tokens, split into inputs and next-token labels, and the sample weights
    are 1 on the response tokens only, so the loss is on the response.
    `response_mask` marks the response, over which the decoder is causal.

    Too long inputs: in training, prompt and response are truncated together
    to `sequence_length + 1` tokens, round-robin (keras-hub's
    `MultiSegmentPacker`: a long prompt is cut, keeping the response, as long
    as the response fits in half the sequence). In `generate`, a prompt that
    leaves no room for a single new token raises a `ValueError`.

    Images, prompts and responses must come in equal numbers (a `ValueError`
    otherwise); one image without a batch axis goes with one prompt.

    Args:
        tokenizer: a `PaliGemmaMoETokenizer`.
        image_converter: a `PaliGemmaMoEImageConverter`, or None to pass the
            images through (they must then have the tower's `image_shape`).
        sequence_length: int. Text tokens per example (the image tokens
            come on top).
        add_start_token, add_end_token: bool.

    Example:
    ```python
    preprocessor = PaliGemmaMoECausalLMPreprocessor(
        PaliGemmaMoETokenizer(proto="vocabulary.spm"),
        PaliGemmaMoEImageConverter(image_size=(64, 64), scale=1 / 127.5, offset=-1),
        sequence_length=32,
    )
    x, y, sample_weight = preprocessor({
        "images": images_uint8, "prompts": ["caption en\\n"] * len(images_uint8),
        "responses": captions,
    })
    ```
    """

    backbone_cls = PaliGemmaMoEBackbone
    tokenizer_cls = PaliGemmaMoETokenizer
    image_converter_cls = PaliGemmaMoEImageConverter

    def _check_inputs(self, x, keys):
        owner = type(self).__name__
        if not isinstance(x, dict) or any(key not in x for key in keys):
            given = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(f"{owner} expects a dict with the keys {list(keys)}; got {given}.")
        counts = {"images": _num_examples(x["images"], unbatched_rank=3)}
        for key in keys[1:]:
            counts[key] = _num_examples(x[key], unbatched_rank=0)
        known = {key: count for key, count in counts.items() if count is not None}
        if len(set(known.values())) > 1:
            listed = ", ".join(f"{count} {key}" for key, count in known.items())
            raise ValueError(
                f"{owner}: got {listed}; every image needs exactly one prompt"
                + (" and one response." if "responses" in keys else ".")
            )

    def _call_python(self, x, y=None, sample_weight=None, sequence_length=None):
        self._check_inputs(x, ("images", "prompts", "responses"))
        return super()._call_python(x, y=y, sample_weight=sample_weight, sequence_length=sequence_length)

    def _generate_preprocess_python(self, x, sequence_length=None):
        keys = ("images", "prompts")
        if isinstance(x, dict) and "responses" in x:  # A response to continue.
            keys += ("responses",)
        self._check_inputs(x, keys)
        outputs = super()._generate_preprocess_python(x, sequence_length=sequence_length)
        if not in_tf_function():  # Values are only known eagerly.
            self._check_room_to_generate(x, outputs["padding_mask"])
        return outputs

    def _check_room_to_generate(self, x, padding_mask):
        padding_mask = convert_to_numpy(padding_mask)
        sequence_length = padding_mask.shape[-1]
        full = padding_mask.reshape(-1, sequence_length).all(axis=-1)
        if not full.any():
            return
        index = int(full.argmax())
        num_tokens = 1 + len(_token_lists(self.tokenizer(x["prompts"]))[index])  # With <bos>.
        with_response = ""
        if "responses" in x:
            num_tokens += len(_token_lists(self.tokenizer(x["responses"]))[index])
            with_response = " with its response"
        raise ValueError(
            f"generate: prompt {index}{with_response} has {num_tokens} tokens with the start "
            f"token, but the sequence length is {sequence_length} (generate's max_length, or "
            "the preprocessor's sequence_length), which leaves no room to generate a token. "
            "Pass a larger max_length or shorten the prompt."
        )
