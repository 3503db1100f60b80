"""Contrastive image-text training of a `LIMoEBackbone` with `fit`."""

import math

import keras
from keras import ops
from keras_hub.models import Task

from keras_vmoe.export import ExportMixin
from keras_vmoe.layers.packing import segment_one_hot
from keras_vmoe.models.limoe.contrastive_loss import CONTRASTIVE_LOSSES
from keras_vmoe.models.limoe.contrastive_loss import contrastive_loss
from keras_vmoe.models.limoe.limoe_backbone import LIMoEBackbone
from keras_vmoe.models.limoe.limoe_preprocessor import LIMoEPreprocessor
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.router_metrics import RouterMetricsMixin
from keras_vmoe.validation import check_choice


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ContrastiveLogits(keras.layers.Layer):
    """(B, P) image and (B, P) text unit vectors -> (B, B) logits
    `min(exp(t), 100) * images @ texts.T + b` with a learned log-temperature
    t (init log 10, as LiT and SigLIP; capped at 100 as CLIP does, which keeps
    training stable) and, for the sigmoid loss, a learned bias b (init -10,
    SigLIP's)."""

    max_temperature = 100.0

    def __init__(self, use_bias=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.use_bias = bool(use_bias)

    def build(self, image_embeddings_shape, text_embeddings_shape=None):
        self.log_temperature = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(10.0)), name="log_temperature"
        )
        self.bias = (
            self.add_weight(shape=(), initializer=keras.initializers.Constant(-10.0), name="bias")
            if self.use_bias
            else None
        )

    def call(self, image_embeddings, text_embeddings):
        logits = ops.matmul(
            ops.cast(image_embeddings, "float32"), ops.transpose(ops.cast(text_embeddings, "float32"))
        )
        logits = logits * self.temperature()
        return logits if self.bias is None else logits + self.bias

    def temperature(self):
        return ops.minimum(ops.exp(self.log_temperature), self.max_temperature)

    def compute_output_shape(self, image_embeddings_shape, text_embeddings_shape=None):
        texts = (text_embeddings_shape or image_embeddings_shape)[0]
        return (image_embeddings_shape[0], texts)

    def get_config(self):
        config = super().get_config()
        config.update(use_bias=self.use_bias)
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LIMoEContrastiveModel(ExportMixin, BuiltinPresetMixin, RouterMetricsMixin, Task):
    """Trains a `LIMoEBackbone` contrastively on image-caption pairs.

    The model maps a batch of pairs to the (images, texts) similarity logits;
    `fit` on `{"images", "text"}` (raw, through the preprocessor) or on
    preprocessed `{"images", "token_ids", "padding_mask"}` needs no labels:
    the i-th caption belongs to the i-th image. The loss is CLIP's softmax
    loss (`loss="softmax"`) or SigLIP's sigmoid loss (`loss="sigmoid"`, with a
    learned bias), plus the MoE layers' auxiliary losses (V-MoE's importance
    and load, LIMoE's entropy losses). The logs show `moe_auxiliary_loss` and
    `moe_dropped_tokens`.

    With a `native_resolution` backbone (NaViT) the pairs are the filled
    image slots of packed sequences: `fit` takes `{"images": [images of any
    sizes], "text": captions}` and packs them with the preprocessor's
    `image_packer`, or a packed batch (the backbone's inputs). The logits
    are over the (batch x max_images_per_sequence) slots, and empty slots
    take no part in the loss.

    Args:
        backbone: a `LIMoEBackbone`.
        preprocessor: None or a `LIMoEPreprocessor`.
        loss: `"softmax"` or `"sigmoid"`.

    Example:
    ```python
    model = LIMoEContrastiveModel(backbone, preprocessor)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    model.fit({"images": images, "text": captions}, batch_size=64, epochs=1)
    ```
    """

    backbone_cls = LIMoEBackbone
    preprocessor_cls = LIMoEPreprocessor

    def __init__(self, backbone, preprocessor=None, loss="softmax", **kwargs):
        check_choice("loss", loss, CONTRASTIVE_LOSSES, owner="LIMoEContrastiveModel")
        # === Layers ===
        packer = getattr(preprocessor, "image_packer", None)
        if packer is not None and backbone.native_resolution:
            packer.check_backbone(backbone, "LIMoEContrastiveModel")
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.logits_layer = ContrastiveLogits(use_bias=loss == "sigmoid", name="contrastive_logits")
        # === Functional model ===
        inputs = backbone.input
        embeddings = backbone(inputs)
        image_embeddings, text_embeddings = embeddings["image_embeddings"], embeddings["text_embeddings"]
        if backbone.native_resolution:  # (B, N, P) -> (B * N, P): one pair per image slot.
            image_embeddings, text_embeddings = (
                ops.reshape(e, (-1, e.shape[-1])) for e in (image_embeddings, text_embeddings)
            )
        logits = self.logits_layer(image_embeddings, text_embeddings)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        # === Config ===
        self.contrastive_loss = loss
        self.track_router_metrics()

    @property
    def temperature(self):
        """The learned logit scale min(exp(t), 100)."""
        return float(ops.convert_to_numpy(self.logits_layer.temperature()))

    def compile(self, optimizer="auto", **kwargs):
        """Compiles with the contrastive loss; `optimizer="auto"`: AdamW(1e-3)."""
        if kwargs.get("loss") not in (None, "auto"):
            raise ValueError(
                "LIMoEContrastiveModel computes its own contrastive loss; choose it with "
                "the `loss` constructor argument ('softmax' or 'sigmoid'), not in compile()."
            )
        kwargs.pop("loss", None)
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(1e-3)
        if kwargs.get("metrics") == "auto":
            kwargs.pop("metrics")
        super().compile(optimizer=optimizer, **kwargs)

    def fit(self, x=None, y=None, **kwargs):
        """keras-hub's `fit`; a native-resolution model also takes
        `{"images": [images of any sizes], "text": captions}`, packed once
        with the preprocessor (`batch_size` counts packed sequences)."""
        if self.backbone.native_resolution and isinstance(x, dict) and "images" in x:
            if self.preprocessor is None:
                raise ValueError(
                    "LIMoEContrastiveModel: packing images of any sizes needs a LIMoEPreprocessor "
                    "with an image_packer; set `preprocessor=` or pass packed batches."
                )
            x = self.preprocessor.pack(x, training=True)
        return super().fit(x, y, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # Keras' loss would need labels; the pairs are their own labels.
        mask = None
        if self.backbone.native_resolution:  # The slots that hold an image and its caption.
            filled = ops.any(segment_one_hot(x["segment_ids"], self.backbone.max_images_per_sequence) > 0, 1)
            captioned = ops.any(ops.cast(x["padding_mask"], "bool"), axis=-1)
            mask = ops.reshape(ops.logical_and(filled, captioned), (-1,))
        loss = contrastive_loss(y_pred, self.contrastive_loss, mask)
        for term in self.losses:
            loss = loss + ops.cast(self._aggregate_additional_loss(term), "float32")
        self.record_router_metrics()
        return loss

    def get_config(self):
        config = super().get_config()
        config.update(loss=self.contrastive_loss)
        return config
