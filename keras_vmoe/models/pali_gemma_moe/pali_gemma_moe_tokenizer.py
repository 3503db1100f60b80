import keras
from keras_hub.models import PaliGemmaTokenizer

from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_backbone import PaliGemmaMoEBackbone
from keras_vmoe.presets import BuiltinPresetMixin


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
