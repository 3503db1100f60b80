import keras
from keras_hub.models import ImageClassifierPreprocessor

from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.vmoe.vmoe_backbone import VMoEBackbone
from keras_vmoe.models.vmoe.vmoe_image_converter import VMoEImageConverter


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VMoEImageClassifierPreprocessor(BuiltinPresetMixin, ImageClassifierPreprocessor):
    """Preprocessor of `VMoEImageClassifier`: runs its `VMoEImageConverter`
    on raw images (and passes labels through)."""

    backbone_cls = VMoEBackbone
    image_converter_cls = VMoEImageConverter
