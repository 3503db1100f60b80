"""The dense ViT's image converter and preprocessor (the families have their own)."""

import keras
from keras_hub.layers import ImageConverter
from keras_hub.models import ImageClassifierPreprocessor

from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.vision_transformer import VisionTransformerBackbone


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VisionTransformerImageConverter(BuiltinPresetMixin, ImageConverter):
    """Resizes images and scales pixels for a dense ViT (`scale=1 / 127.5,
    offset=-1` maps uint8 pixels to vmoe's [-1, 1]).

    Example:
    >>> converter = VisionTransformerImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    >>> tuple(converter(np.full((1, 64, 64, 3), 255, "uint8")).shape)
    (1, 32, 32, 3)
    """

    backbone_cls = VisionTransformerBackbone


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VisionTransformerImageClassifierPreprocessor(BuiltinPresetMixin, ImageClassifierPreprocessor):
    """Preprocessor of the dense `VisionTransformerImageClassifier`: runs its
    image converter on raw images (and passes labels through)."""

    backbone_cls = VisionTransformerBackbone
    image_converter_cls = VisionTransformerImageConverter
