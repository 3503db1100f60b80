"""Turns raw images and captions into LIMoE inputs."""

import keras
import numpy as np
import tensorflow as tf
from keras_hub.layers import StartEndPacker
from keras_hub.models import Preprocessor

from keras_vmoe.keras_hub_internals import preprocessing_function
from keras_vmoe.models.limoe.limoe_backbone import LIMoEBackbone
from keras_vmoe.models.limoe.limoe_image_converter import LIMoEImageConverter
from keras_vmoe.models.limoe.limoe_tokenizer import LIMoETokenizer
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin


def _require(condition, message):
    """Raises ValueError(message) eagerly; inside a tf.data graph, a runtime
    assertion with the same message."""

    if tf.executing_eagerly():
        if not bool(condition):
            raise ValueError(message)
        return
    tf.debugging.Assert(condition, [message])


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LIMoEPreprocessor(BuiltinPresetMixin, Preprocessor):
    """Preprocessor for LIMoE: `{"images", "text"}` in, model inputs out.

    - `"images"`: raw images, resized and scaled by the image converter.
    - `"text"`: strings, tokenized and packed to `sequence_length` as
      `<s> tokens </s>` plus padding, with a `padding_mask`. **Longer
      captions are truncated**: their first `sequence_length - 2` tokens are
      kept, then `</s>`.

    Given a dict with both keys it returns `{"images", "token_ids",
    "padding_mask"}`; with only `"text"`, `{"token_ids", "padding_mask"}`;
    given a bare image batch (not a dict) it returns the converted images,
    which is what `LIMoEZeroShotClassifier.predict` passes.

    For a `native_resolution` backbone (NaViT) give an `image_packer` (a
    `NativeResolutionImageClassifierPreprocessor`, e.g. from its
    `for_backbone`): `pack({"images": [images of any sizes], "text":
    captions})` then returns the packed batch, each caption laid out in its
    image's slot, (sequences, max_images_per_sequence, sequence_length);
    `LIMoEContrastiveModel.fit` calls it. A packed batch passes through
    `call` unchanged.

    Errors: images and captions in different numbers, and an empty caption
    (nothing to embed), raise a ValueError naming the problem (inside a
    `tf.data` pipeline, an assertion with the same message).

    Example:
    >>> from keras_vmoe.models import LIMoEImageConverter, train_limoe_vocabulary
    >>> proto = train_limoe_vocabulary(["a photo of a cat.", "a photo of a dog."], 300)
    >>> preprocessor = LIMoEPreprocessor(
    ...     LIMoETokenizer(proto=proto),
    ...     LIMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0),
    ...     sequence_length=8)
    >>> x = preprocessor({"images": np.zeros((1, 64, 64, 3), "uint8"),
    ...                   "text": ["a photo of a cat."]})
    >>> sorted(x)
    ['images', 'padding_mask', 'token_ids']
    """

    backbone_cls = LIMoEBackbone
    tokenizer_cls = LIMoETokenizer
    image_converter_cls = LIMoEImageConverter

    def __init__(self, tokenizer, image_converter=None, sequence_length=16, image_packer=None, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.image_converter = image_converter
        self.image_packer = image_packer
        if int(sequence_length) < 3:
            raise ValueError(
                f"LIMoEPreprocessor: sequence_length must be at least 3 (<s>, one token, "
                f"</s>), got {sequence_length}."
            )
        self.sequence_length = int(sequence_length)
        self.packer = None

    def build(self, input_shape):
        self.packer = StartEndPacker(
            start_value=self.tokenizer.start_token_id,
            end_value=self.tokenizer.end_token_id,
            pad_value=self.tokenizer.pad_token_id,
            sequence_length=self.sequence_length,
            return_padding_mask=True,
        )
        self.built = True

    def convert_images(self, images):
        if self.image_converter is None:
            raise ValueError("LIMoEPreprocessor: got images but has no image_converter.")
        return self.image_converter(images)

    def tokenize(self, text):
        """Strings (batch,) -> (token_ids, padding_mask), each (batch, sequence_length)."""

        pieces = self.tokenizer(text)
        message = (
            "LIMoEPreprocessor: a caption is empty (no tokens to embed); every text must "
            "have at least one token."
        )
        if isinstance(pieces, tf.RaggedTensor):
            _require(tf.reduce_all(pieces.row_lengths() > 0), message)
        elif isinstance(pieces, (list, tuple)):  # keras-hub's eager, TF-free path.
            if any(len(row) == 0 for row in pieces):
                raise ValueError(message)
        return self.packer(pieces)

    def pack(self, x, training=False):
        """`{"images": [images of any sizes], "text": captions}` -> the packed
        batch of a native-resolution backbone (NumPy)."""
        if self.image_packer is None:
            raise ValueError(
                "LIMoEPreprocessor.pack needs an image_packer (a "
                "NativeResolutionImageClassifierPreprocessor.for_backbone(...))."
            )
        if not isinstance(x, dict) or set(x) != {"images", "text"}:
            raise ValueError(
                "LIMoEPreprocessor.pack takes {'images': [...], 'text': [...]}, got "
                f"{sorted(x) if isinstance(x, dict) else type(x).__name__}."
            )
        text = self({"text": np.asarray(x["text"])})
        captions = {key: np.asarray(keras.ops.convert_to_numpy(text[key])) for key in text}
        if len(captions["token_ids"]) != len(x["images"]):
            raise ValueError(
                f"LIMoEPreprocessor: got {len(x['images'])} images but {len(captions['token_ids'])} "
                "captions; give one caption per image."
            )
        packed, captions, _, _ = self.image_packer.pack(x["images"], captions, training=training)
        return {**packed, **captions}

    @preprocessing_function
    def call(self, x, y=None, sample_weight=None):

        if isinstance(x, dict) and "segment_ids" in x:  # Already packed (native resolution).
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        if not isinstance(x, dict):
            return keras.utils.pack_x_y_sample_weight(self.convert_images(x), y, sample_weight)
        unknown = set(x) - {"images", "text"}
        if unknown or not x:
            raise ValueError(
                f"LIMoEPreprocessor: expected a dict with 'images' and/or 'text', got the keys {sorted(x)}."
            )
        outputs = {}
        if "images" in x and "text" in x:
            images, text = x["images"], x["text"]
            num_images, num_texts = images.shape[0], text.shape[0]
            if num_images is not None and num_texts is not None:
                if num_images != num_texts:
                    raise ValueError(
                        f"LIMoEPreprocessor: got {num_images} images but {num_texts} "
                        "captions; give one caption per image."
                    )
            else:
                _require(
                    tf.equal(tf.shape(images)[0], tf.shape(text)[0]),
                    "LIMoEPreprocessor: images and captions differ in number; give one caption per image.",
                )
        if "images" in x:
            outputs["images"] = self.convert_images(x["images"])
        if "text" in x:
            outputs["token_ids"], outputs["padding_mask"] = self.tokenize(x["text"])
        return keras.utils.pack_x_y_sample_weight(outputs, y, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.update(sequence_length=self.sequence_length)
        if self.image_packer is not None:
            config["image_packer"] = keras.layers.serialize(self.image_packer)
        return config

    @classmethod
    def from_config(cls, config):
        if isinstance(config.get("image_packer"), dict):
            config["image_packer"] = keras.layers.deserialize(config["image_packer"])
        return super().from_config(config)
