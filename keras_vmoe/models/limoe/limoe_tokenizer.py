"""The LIMoE text tokenizer: a SentencePiece vocabulary shipped with the preset."""

import keras
import tensorflow as tf
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_vmoe.models.limoe.limoe_backbone import LIMoEBackbone
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.sentencepiece_vocabulary import train_sentencepiece

PAD, UNKNOWN, START, END = "<pad>", "<unk>", "<s>", "</s>"


def train_limoe_vocabulary(texts, vocabulary_size):
    """Trains a lower-casing unigram SentencePiece vocabulary on `texts`.

    Pieces 0 to 3 are `<pad>`, `<unk>`, `<s>` and `</s>`; byte fallback
    spells any word the texts never showed, so no caption maps to `<unk>`
    alone. `vocabulary_size` is an upper bound (a small corpus yields fewer
    pieces). Returns the serialized model (bytes) for `LIMoETokenizer`.

    Example:
    >>> proto = train_limoe_vocabulary(["a photo of a cat.", "a photo of a dog."], 300)
    >>> len(LIMoETokenizer(proto=proto)("A photo of a cat.")) > 0
    True
    """
    return train_sentencepiece(
        texts,
        vocabulary_size,
        dict(pad=(0, PAD), unk=(1, UNKNOWN), bos=(2, START), eos=(3, END)),
        owner="train_limoe_vocabulary",
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc_cf",  # NFKC and case folding.
    )


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LIMoETokenizer(BuiltinPresetMixin, SentencePieceTokenizer):
    """keras-hub's `SentencePieceTokenizer` with LIMoE's special tokens.

    Survives reseeding: tf-text keeps the SentencePiece model in a
    kernel-owned TensorFlow resource, and `tf.random.set_seed` (which
    `keras.utils.set_random_seed` calls) clears TensorFlow's eager kernel
    cache and that resource with it, so a plain keras-hub tokenizer built
    before a reseed fails in a `tf.data` pipeline (raw-text `fit` on
    TensorFlow) with "Resource ... SentencepieceResource does not exist".
    This tokenizer checks its op before each use (one tiny eager op) and
    rebuilds it from the proto when TensorFlow dropped it.

    Args:
        proto: a SentencePiece model (bytes or a file path), e.g. from
            `train_limoe_vocabulary`; saved with the preset as an asset.
    """

    backbone_cls = LIMoEBackbone

    def __init__(self, proto=None, **kwargs):
        self._add_special_token(START, "start_token")
        self._add_special_token(END, "end_token")
        self._add_special_token(PAD, "pad_token")
        super().__init__(proto=proto, **kwargs)

    def _maybe_initialized_tf(self):
        super()._maybe_initialized_tf()
        if self.proto is not None and not self._sentence_piece_alive():
            self._set_proto_tf(self.proto)

    def _sentence_piece_alive(self):
        """Whether tf-text's SentencePiece resource still exists (see above)."""

        with tf.init_scope():  # Eagerly, also while a tf.data map is traced.
            try:
                self._sentence_piece.vocab_size()
            except tf.errors.NotFoundError:
                return False
        return True
