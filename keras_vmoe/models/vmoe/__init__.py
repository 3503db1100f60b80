from keras_vmoe.models.vmoe.vmoe_architectures import VMOE_ARCHITECTURES
from keras_vmoe.models.vmoe.vmoe_backbone import VMoEBackbone
from keras_vmoe.models.vmoe.vmoe_image_classifier import VMoEImageClassifier
from keras_vmoe.models.vmoe.vmoe_image_classifier_preprocessor import (
    VMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vmoe.vmoe_image_converter import VMoEImageConverter
from keras_vmoe.presets import VMOE_CHECKPOINT_PRESETS
from keras_vmoe.presets import register_vmoe_checkpoint_preset

for _preset in list(VMOE_CHECKPOINT_PRESETS.values()):
    register_vmoe_checkpoint_preset(_preset)
