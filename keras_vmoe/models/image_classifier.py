"""Image classification on top of a pooled `VisionTransformerBackbone`."""

import keras
import numpy as np
from keras import ops
from keras_hub.models import ImageClassifier
from keras_hub.models import Task

from keras_vmoe.export import ExportMixin
from keras_vmoe.layers.ensemble import ensemble_log_mean
from keras_vmoe.layers.ensemble import member_logits
from keras_vmoe.models.native_resolution_preprocessing import NativeResolutionImageClassifierPreprocessor
from keras_vmoe.models.native_resolution_preprocessing import image_rows
from keras_vmoe.models.native_resolution_preprocessing import is_packed
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.router_metrics import RouterMetricsMixin
from keras_vmoe.models.vision_transformer import VisionTransformerBackbone
from keras_vmoe.models.vision_transformer_preprocessing import VisionTransformerImageClassifierPreprocessor


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VisionTransformerImageClassifier(ExportMixin, BuiltinPresetMixin, RouterMetricsMixin, ImageClassifier):
    """A linear head (vmoe's `head`) on the pooled features of a backbone.

    The task outputs logits. Calling the model on pixels applies no
    preprocessing; `predict`, `fit` and `evaluate` on raw images go through
    the preprocessor, as in keras-hub. During `fit` and `evaluate` the logs
    show `moe_auxiliary_loss` and `moe_dropped_tokens` when the backbone has
    MoE layers.

    Args:
        backbone: a backbone with `pooling` set (its output is one vector per
            image).
        num_classes: int.
        preprocessor: None or an `ImageClassifierPreprocessor`.
        dropout: float. Dropout before the head.
        head_bias_init: float. Initial bias of the head (vmoe's paper configs
            use -log(num_classes)).
        head_kernel_zero_init: bool. Zero-initialise the head kernel (vmoe's
            default for fine-tuning).

    On a `VisionTransformerBackbone` it is the dense ViT's classifier (the
    `vit_tiny_cifar10` preset); the families subclass it.

    On an E^3 backbone (`ensemble_size` M > 1) the one head serves every
    member, as in vmoe: calling the model gives the raw logits, M rows per
    image (row b * M + m = member m of image b); `predict` and
    `predict_on_batch` give the ensemble's log of the members' mean
    probability, (B, num_classes) (vmoe's evaluator); `predict_members` the
    members' logits (B, M, num_classes). `fit` trains with the compiled loss
    on every member against its image's label (vmoe's ensemble
    cross-entropy, labels repeated M times) and computes the compiled metrics
    on the ensemble's prediction.

    On a native-resolution backbone (NaViT, `native_resolution=True`) the
    model maps packed sequences to (sequences, N, num_classes), one row per
    image slot; `predict`, `fit` and `evaluate` take a list of images of any
    sizes, packed by a `NativeResolutionImageClassifierPreprocessor`, and
    `predict` gives (num_images, num_classes) in the images' order.
    """

    backbone_cls = VisionTransformerBackbone
    preprocessor_cls = VisionTransformerImageClassifierPreprocessor

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        dropout=0.0,
        head_bias_init=0.0,
        head_kernel_zero_init=False,
        head_dtype=None,
        **kwargs,
    ):
        if getattr(backbone, "pooling", "token") is None:
            raise ValueError(
                f"{type(self).__name__} needs a backbone that pools its tokens "
                "(pooling='token', 'gap' or 'map'); this one has pooling=None."
            )
        if isinstance(preprocessor, NativeResolutionImageClassifierPreprocessor):
            if not getattr(backbone, "native_resolution", False):
                raise ValueError(
                    f"{type(self).__name__}: a NativeResolutionImageClassifierPreprocessor needs a "
                    "backbone with native_resolution=True."
                )
            preprocessor.check_backbone(backbone, type(self).__name__)
        head_dtype = head_dtype or backbone.dtype_policy
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.output_dropout = keras.layers.Dropout(dropout, dtype=head_dtype, name="output_dropout")
        self.head = keras.layers.Dense(
            num_classes,
            kernel_initializer="zeros" if head_kernel_zero_init else "glorot_uniform",
            bias_initializer=keras.initializers.Constant(head_bias_init),
            dtype=head_dtype,
            name="head",
        )
        # === Functional model ===
        inputs = self.backbone.input
        x = self.backbone(inputs)
        outputs = self.head(self.output_dropout(x))
        Task.__init__(self, inputs=inputs, outputs=outputs, **kwargs)
        # === Config ===
        self.num_classes = num_classes
        self.dropout = dropout
        self.head_bias_init = head_bias_init
        self.head_kernel_zero_init = head_kernel_zero_init
        self.activation = None
        self.track_router_metrics()

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """keras-hub's `from_preset`; a family's class (`VMoEImageClassifier`,
        `SoftMoEImageClassifier`) also loads a dense ViT preset (such as
        `vit_tiny_cifar10`, saved with the dense classes since 0.2), as that
        family's model without MoE layers: the same weights and outputs."""
        try:
            return super().from_preset(preset, *args, **kwargs)
        except ValueError as error:
            dense_preset = f"compatible with {VisionTransformerBackbone.__name__} found" in str(error)
            if cls is VisionTransformerImageClassifier or not dense_preset:
                raise
        dense = VisionTransformerImageClassifier.from_preset(preset, *args, **kwargs)
        backbone_config = dense.backbone.get_config()
        backbone_config.pop("name", None)
        model = cls(
            cls.backbone_cls(**backbone_config),
            num_classes=dense.num_classes,
            preprocessor=dense.preprocessor,
            dropout=dense.dropout,
            head_bias_init=dense.head_bias_init,
            head_kernel_zero_init=dense.head_kernel_zero_init,
        )
        model.set_weights(dense.get_weights())
        return model

    @property
    def ensemble_size(self):
        """E^3's M (1 for a single model)."""
        return getattr(self.backbone, "ensemble_size", 1)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.ensemble_size > 1:
            # vmoe's E^3 loss: every member against its image's label.
            repeat = lambda v: None if v is None else ops.repeat(v, self.ensemble_size, axis=0)  # noqa: E731
            y, sample_weight = (
                keras.tree.map_structure(repeat, y),
                keras.tree.map_structure(repeat, sample_weight),
            )
        return super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self.ensemble_size > 1:
            y_pred = ensemble_log_mean(y_pred, self.ensemble_size)
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    @property
    def native_resolution(self):
        """Whether the backbone takes packed images of any size (NaViT)."""
        return getattr(self.backbone, "native_resolution", False)

    def compile(self, optimizer="auto", loss="auto", *, metrics="auto", **kwargs):
        """keras-hub's `compile`. A native-resolution model weighs the real
        images only (empty image slots have weight 0): its default loss
        averages over them (`reduction="mean_with_sample_weight"`) and its
        `metrics` are computed as weighted metrics."""
        if self.native_resolution:
            if loss == "auto":
                loss = keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True, reduction="mean_with_sample_weight"
                )
            if metrics == "auto":
                metrics = [keras.metrics.SparseCategoricalAccuracy()]
            if "weighted_metrics" not in kwargs:
                metrics, kwargs["weighted_metrics"] = None, metrics
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def _pack(self, x, y=None, sample_weight=None, training=False):
        """Packs a list of images of any sizes with the preprocessor (a
        native-resolution model); returns None for other inputs."""
        if not self.native_resolution or is_packed(x) or not isinstance(x, (list, tuple, np.ndarray)):
            return None
        if not isinstance(self.preprocessor, NativeResolutionImageClassifierPreprocessor):
            raise ValueError(
                f"{type(self).__name__}: a native-resolution model packs lists of images with a "
                "NativeResolutionImageClassifierPreprocessor; set `preprocessor=` (see "
                "NativeResolutionImageClassifierPreprocessor.for_backbone), or pass packed batches."
            )
        return self.preprocessor.pack(x, y, sample_weight, training=training)

    def predict(self, x, *args, **kwargs):
        """keras-hub's `predict`; an E^3 model returns the ensemble's log
        mean probability (B, num_classes). A native-resolution model takes a
        list of images of any sizes and returns one row per image, in order."""
        packed = self._pack(x)
        if packed is not None:
            return image_rows(super().predict(packed[0], *args, **kwargs), packed[3])
        return self._ensemble_prediction(super().predict(x, *args, **kwargs))

    def fit(self, x=None, y=None, sample_weight=None, validation_data=None, **kwargs):
        """keras-hub's `fit`. A native-resolution model takes a list of
        images of any sizes and their labels: they are packed once (with the
        preprocessor's token dropping and budget range), `batch_size` counts
        packed sequences, and empty image slots get weight 0."""
        packed = self._pack(x, y, sample_weight, training=True)
        if packed is not None:
            x, y, sample_weight, _ = packed
            if isinstance(validation_data, (list, tuple)) and self._pack(validation_data[0]) is not None:
                validation_data = self._pack(*validation_data)[:3]
        return super().fit(x, y, sample_weight=sample_weight, validation_data=validation_data, **kwargs)

    def evaluate(self, x=None, y=None, sample_weight=None, **kwargs):
        """keras-hub's `evaluate`; a native-resolution model takes a list of
        images of any sizes, as `fit`."""
        packed = self._pack(x, y, sample_weight)
        if packed is not None:
            x, y, sample_weight, _ = packed
        return super().evaluate(x, y, sample_weight=sample_weight, **kwargs)

    def predict_on_batch(self, x):
        return self._ensemble_prediction(super().predict_on_batch(x))

    def predict_members(self, x, *args, **kwargs):
        """The ensemble members' logits, (B, M, num_classes) (M = 1 for a
        single model); the arguments are `predict`'s."""
        logits = super().predict(x, *args, **kwargs)
        return ops.convert_to_numpy(member_logits(logits, self.ensemble_size))

    def _ensemble_prediction(self, logits):
        if self.ensemble_size == 1:
            return logits
        return ops.convert_to_numpy(ensemble_log_mean(logits, self.ensemble_size))

    def get_config(self):
        # keras-hub's ImageClassifier config names its own pooling head; ours
        # lives in the backbone, so start from the Task config.
        config = Task.get_config(self)
        config.update(
            num_classes=self.num_classes,
            dropout=self.dropout,
            head_bias_init=self.head_bias_init,
            head_kernel_zero_init=self.head_kernel_zero_init,
        )
        return config
