import keras
from keras_hub.models import ImageClassifierPreprocessor

from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.soft_moe.soft_moe_backbone import SoftMoEBackbone
from keras_vmoe.models.soft_moe.soft_moe_image_converter import SoftMoEImageConverter


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftMoEImageClassifierPreprocessor(BuiltinPresetMixin, ImageClassifierPreprocessor):
    """Preprocessor of `SoftMoEImageClassifier`."""

    backbone_cls = SoftMoEBackbone
    image_converter_cls = SoftMoEImageConverter
