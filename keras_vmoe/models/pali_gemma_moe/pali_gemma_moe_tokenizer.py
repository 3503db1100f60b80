import keras
from keras_hub.models import PaliGemmaTokenizer

from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_backbone import PaliGemmaMoEBackbone
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.sentencepiece_vocabulary import train_sentencepiece


def train_pali_gemma_moe_vocabulary(texts, vocabulary_size):
    """Trains a word-level SentencePiece vocabulary on `texts` with
    PaliGemma's special pieces (`<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3),
    for `PaliGemmaMoETokenizer`; words it never saw map to `<unk>`.
    `vocabulary_size` is an upper bound. Returns the serialized model (bytes).

    Example:
    ```python
    proto = train_pali_gemma_moe_vocabulary(["caption en", "a cat on a mat"], 100)
    tokenizer = PaliGemmaMoETokenizer(proto=proto)
    ```
    """
    return train_sentencepiece(
        texts,
        vocabulary_size,
        dict(pad=(0, "<pad>"), bos=(1, "<bos>"), eos=(2, "<eos>"), unk=(3, "<unk>")),
        owner="train_pali_gemma_moe_vocabulary",
        model_type="WORD",
    )


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PaliGemmaMoETokenizer(BuiltinPresetMixin, PaliGemmaTokenizer):
    """keras-hub's PaliGemma SentencePiece tokenizer, for `PaliGemmaMoEBackbone`.

    The vocabulary needs the `<pad>`, `<bos>` and `<eos>` pieces.

    Example:
    ```python
    tokenizer = PaliGemmaMoETokenizer(proto="vocabulary.spm")
    tokenizer(["a cat on a mat"])
    ```
    """

    backbone_cls = PaliGemmaMoEBackbone
