import keras

from keras_vmoe.models.image_classifier import VisionTransformerImageClassifier
from keras_vmoe.models.vmoe.vmoe_backbone import VMoEBackbone
from keras_vmoe.models.vmoe.vmoe_image_classifier_preprocessor import VMoEImageClassifierPreprocessor


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VMoEImageClassifier(VisionTransformerImageClassifier):
    """V-MoE image classifier: a `VMoEBackbone` and a linear head.

    Example: fine-tune a tiny V-MoE on raw uint8 images.
    >>> from keras_vmoe.models import VMoEImageConverter
    >>> backbone = VMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=32,
    ...     mlp_dim=64, num_heads=2, moe_layers=(1,), num_experts=4,
    ...     num_selected_experts=2)
    >>> preprocessor = VMoEImageClassifierPreprocessor(
    ...     VMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0))
    >>> classifier = VMoEImageClassifier(backbone, num_classes=10, preprocessor=preprocessor)
    >>> images = np.random.randint(0, 256, (8, 32, 32, 3), dtype="uint8")
    >>> labels = np.arange(8) % 10
    >>> history = classifier.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    >>> sorted(history.history)
    ['loss', 'moe_auxiliary_loss', 'moe_dropped_tokens', 'sparse_categorical_accuracy']
    """

    backbone_cls = VMoEBackbone
    preprocessor_cls = VMoEImageClassifierPreprocessor
