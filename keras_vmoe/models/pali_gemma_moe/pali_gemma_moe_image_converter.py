import keras
from keras_hub.layers import ImageConverter

from keras_vmoe.models.pali_gemma_moe.pali_gemma_moe_backbone import PaliGemmaMoEBackbone
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PaliGemmaMoEImageConverter(BuiltinPresetMixin, ImageConverter):
    """Resizes images to the image tower's size and scales their pixels.

    PaliGemma feeds pixels in [-1, 1]: `scale=1 / 127.5, offset=-1` for
    uint8 images. Images of any size are resized to `image_size` (keras-hub
    crops to the aspect ratio first), so they must be resized here, not by
    the model: the model takes exactly its image tower's `image_shape`.
    """

    backbone_cls = PaliGemmaMoEBackbone
