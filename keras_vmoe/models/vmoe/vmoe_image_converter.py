import keras
from keras_hub.layers import ImageConverter

from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.vmoe.vmoe_backbone import VMoEBackbone


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VMoEImageConverter(BuiltinPresetMixin, ImageConverter):
    """Resizes images and scales pixels for V-MoE models.

    vmoe feeds pixels in [-1, 1]: for uint8 images use
    `scale=1 / 127.5, offset=-1` (the default of presets made here).

    Example:
    >>> converter = VMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    >>> tuple(converter(np.full((1, 64, 64, 3), 255, "uint8")).shape)
    (1, 32, 32, 3)
    """

    backbone_cls = VMoEBackbone
