import keras
from keras_hub.layers import ImageConverter

from keras_vmoe.models.limoe.limoe_backbone import LIMoEBackbone
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LIMoEImageConverter(BuiltinPresetMixin, ImageConverter):
    """Resizes images and scales pixels for LIMoE models (presets made here
    use `scale=1 / 127.5, offset=-1`: pixels in [-1, 1])."""

    backbone_cls = LIMoEBackbone
