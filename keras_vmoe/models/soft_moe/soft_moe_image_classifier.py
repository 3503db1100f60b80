import keras

from keras_vmoe.models.image_classifier import VisionTransformerImageClassifier
from keras_vmoe.models.soft_moe.soft_moe_backbone import SoftMoEBackbone
from keras_vmoe.models.soft_moe.soft_moe_image_classifier_preprocessor import (
    SoftMoEImageClassifierPreprocessor,
)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftMoEImageClassifier(VisionTransformerImageClassifier):
    """Soft MoE image classifier: a `SoftMoEBackbone` and a linear head.

    Example:
    >>> backbone = SoftMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=32,
    ...     mlp_dim=64, num_heads=2, moe_layers=(1,), num_experts=4)
    >>> classifier = SoftMoEImageClassifier(backbone, num_classes=10)
    >>> tuple(classifier(np.zeros((2, 32, 32, 3))).shape)
    (2, 10)
    """

    backbone_cls = SoftMoEBackbone
    preprocessor_cls = SoftMoEImageClassifierPreprocessor
