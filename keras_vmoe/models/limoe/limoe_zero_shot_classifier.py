"""Zero-shot image classification with a trained `LIMoEBackbone`."""

import keras
import numpy as np
from keras import ops
from keras_hub.models import Task

from keras_vmoe.export import ExportMixin
from keras_vmoe.models.limoe.limoe_backbone import LIMoEBackbone
from keras_vmoe.models.limoe.limoe_preprocessor import LIMoEPreprocessor
from keras_vmoe.models.limoe.sequence_ops import normalized_embedding
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin

# Templates in the style of CLIP's ImageNet prompts.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of the {}.", "an image of a {}.")


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ClassEmbeddingLogits(keras.layers.Layer):
    """(B, P) image unit vectors -> (B, classes) logits `scale * images @ classes.T`
    against fixed (classes, P) class embeddings, stored as a weight."""

    def __init__(self, num_classes, embedding_dim, scale=100.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.scale = float(scale)

    def build(self, input_shape):
        self.class_embeddings = self.add_weight(
            shape=(self.num_classes, self.embedding_dim),
            initializer="zeros",
            trainable=False,
            name="class_embeddings",
        )

    def set_class_embeddings(self, embeddings):
        """Stores (classes, P) `embeddings`; the number of classes may change
        (the weight is then replaced by one of the new shape)."""
        embeddings = np.asarray(embeddings, "float32")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{self.name}: class embeddings must have shape (classes, "
                f"{self.embedding_dim}), got {embeddings.shape}."
            )
        if embeddings.shape[0] != self.num_classes:
            del self.class_embeddings  # Untracks the old weight.
            self.num_classes = embeddings.shape[0]
            # Keras locks a built layer's variable tracker; a new weight of
            # another shape is the point here.
            locked = self._tracker.locked
            self._tracker.unlock()
            try:
                self.build(None)
            finally:
                if locked:
                    self._tracker.lock()
        self.class_embeddings.assign(embeddings)

    def call(self, image_embeddings):
        logits = ops.matmul(ops.cast(image_embeddings, "float32"), ops.transpose(self.class_embeddings))
        return self.scale * logits

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, embedding_dim=self.embedding_dim, scale=self.scale)
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LIMoEZeroShotClassifier(ExportMixin, BuiltinPresetMixin, Task):
    """Classifies images by their similarity to embedded class descriptions.

    Each class is embedded as the normalised mean of the text embeddings of
    its name in every template (CLIP's prompt ensembling); an image's logits
    are `scale` times its cosine similarity to each class. `predict` takes
    raw images (through the preprocessor's image converter) and returns
    logits; `set_classes` embeds another label set, of any size, without
    retraining, and `from_preset(name, class_names=..., templates=...)` loads
    a preset for your own labels. Saving keeps the current labels.

    Args:
        backbone: a trained `LIMoEBackbone`.
        preprocessor: a `LIMoEPreprocessor` (its tokenizer embeds the class
            descriptions; its image converter prepares images for `predict`).
        class_names: list of str.
        templates: list of str with one `{}` each, e.g. `"a photo of a {}."`.
        scale: float. Logit scale (softmax temperature), e.g. the contrastive
            model's learned `temperature`.

    Example:
    ```python
    classifier = LIMoEZeroShotClassifier.from_preset(
        "limoe_tiny_cifar10", class_names=["cat", "dog", "tractor"]
    )
    classifier.predict(images)  # (batch, 3) logits
    classifier.set_classes(["cat", "dog"], ["a photo of my {}."])
    classifier.predict(images)  # (batch, 2) logits
    ```
    """

    backbone_cls = LIMoEBackbone
    preprocessor_cls = LIMoEPreprocessor

    def __init__(
        self, backbone, preprocessor, class_names, templates=DEFAULT_TEMPLATES, scale=100.0, **kwargs
    ):
        class_names, templates = self._check_classes(class_names, templates)
        if preprocessor is None:
            raise ValueError(
                "LIMoEZeroShotClassifier needs a LIMoEPreprocessor: its tokenizer embeds "
                "the class descriptions."
            )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.class_logits = ClassEmbeddingLogits(
            len(class_names), backbone.embedding_dim, scale, name="class_logits"
        )
        # === Functional model ===
        images = keras.Input(shape=backbone.image_shape, name="images")
        logits = self.class_logits(backbone.embed_images(images))
        super().__init__(inputs=images, outputs=logits, **kwargs)
        # === Config ===
        self.class_names = class_names
        self.templates = templates
        self.scale = float(scale)
        # A classifier restored from a preset gets its vocabulary and its
        # stored class embeddings after construction.
        if getattr(preprocessor.tokenizer, "proto", None) is not None:
            self.class_logits.class_embeddings.assign(self.embed_classes(class_names, templates))

    @staticmethod
    def _check_classes(class_names, templates):
        class_names = [str(name) for name in class_names]
        templates = [str(template) for template in templates]
        if not class_names:
            raise ValueError("LIMoEZeroShotClassifier: `class_names` is empty.")
        if not templates:
            raise ValueError("LIMoEZeroShotClassifier: `templates` is empty.")
        for template in templates:
            if template.count("{}") != 1:
                raise ValueError(
                    "LIMoEZeroShotClassifier: every template needs exactly one '{}' where "
                    f"the class name goes, got {template!r}."
                )
        return class_names, templates

    def embed_classes(self, class_names, templates):
        """(classes, P) unit vectors: the mean over templates of each class's
        text embeddings, normalised again."""
        texts = [template.format(name) for name in class_names for template in templates]
        inputs = self.preprocessor({"text": texts})
        embeddings = self.backbone.embed_text(inputs["token_ids"], inputs["padding_mask"])
        embeddings = ops.reshape(embeddings, (len(class_names), len(templates), -1))
        return np.asarray(ops.convert_to_numpy(normalized_embedding(ops.mean(embeddings, axis=1))))

    def set_classes(self, class_names, templates=None):
        """Embeds a new label set, of any size, without retraining.

        `templates` (default: the current ones) each hold one `{}`. The
        logits then have one column per name, in order.
        """
        class_names, templates = self._check_classes(
            class_names, self.templates if templates is None else templates
        )
        self.class_logits.set_class_embeddings(self.embed_classes(class_names, templates))
        self.class_names, self.templates = class_names, templates
        # Compiled predict / evaluate steps were traced for the old count.
        self.predict_function = self.test_function = self.train_function = None

    @classmethod
    def from_preset(cls, preset, class_names=None, templates=None, **kwargs):
        """Loads a preset; `class_names` / `templates` replace its labels.

        Example:
        ```python
        classifier = LIMoEZeroShotClassifier.from_preset(
            "limoe_tiny_cifar10", class_names=["cat", "dog", "bird"],
            templates=["a photo of a {}.", "a blurry photo of a {}."],
        )
        ```
        """
        classifier = super().from_preset(preset, **kwargs)
        if class_names is not None or templates is not None:
            classifier.set_classes(classifier.class_names if class_names is None else class_names, templates)
        return classifier

    def get_config(self):
        config = super().get_config()
        config.update(class_names=self.class_names, templates=self.templates, scale=self.scale)
        return config
