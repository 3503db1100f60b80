from keras_vmoe.models.vmoe.vmoe_architectures import VMOE_ARCHITECTURES
from keras_vmoe.models.vmoe.vmoe_backbone import VMoEBackbone
from keras_vmoe.models.vmoe.vmoe_image_classifier import VMoEImageClassifier
from keras_vmoe.models.vmoe.vmoe_image_classifier_preprocessor import (
    VMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vmoe.vmoe_image_converter import VMoEImageConverter
from keras_vmoe.models.vmoe.vmoe_presets import VMOE_CHECKPOINT_PRESETS
from keras_vmoe.models.vmoe.vmoe_presets import VMoECheckpointPreset
