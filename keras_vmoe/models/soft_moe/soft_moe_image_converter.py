import keras
from keras_hub.layers import ImageConverter

from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.soft_moe.soft_moe_backbone import SoftMoEBackbone


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftMoEImageConverter(BuiltinPresetMixin, ImageConverter):
    """Resizes images and scales pixels for Soft MoE models (vmoe feeds
    [-1, 1]: `scale=1 / 127.5, offset=-1` for uint8 images)."""

    backbone_cls = SoftMoEBackbone
