"""A PaliGemma-style vision-language backbone whose image tower is any of our
encoders: a dense ViT, a V-MoE, a Soft MoE, an upcycled one.

    images (B, H, W, C) -> image_encoder (pooling=None) -> (B, N, D_vit)
                        -> image_projection (Dense)     -> (B, N, D)
    token_ids (B, T)    -> token_embedding * sqrt(D)    -> (B, T, D)
    [image tokens ; text tokens] (B, N + T, D)
        -> PaliGemmaDecoderBlock x num_layers -> RMSNorm -> (B, N + T, D)

Attention is full over the image and prompt tokens and causal over the
response tokens (keras-hub's `PaliGemmaDecoderBlock`, reused as is, with its
Gemma / Gemma 2 options). Everything after the image tower is keras-hub's
`PaliGemmaBackbone`, layer for layer, so a keras-hub PaliGemma converts onto
it weight for weight (`keras_vmoe.convert.from_keras_hub_pali_gemma`).
"""

import math

import keras
from keras import ops
from keras.layers import ReversibleEmbedding
from keras_hub.models import Backbone

from keras_vmoe.export import ExportMixin
from keras_vmoe.keras_hub_internals import PaliGemmaDecoderBlock
from keras_vmoe.keras_hub_internals import RMSNormalization
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.models.vision_transformer import VisionTransformerBackbone
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int


def check_image_encoder(image_encoder, owner):
    if not isinstance(image_encoder, VisionTransformerBackbone):
        raise ValueError(
            f"{owner}: image_encoder must be a keras_vmoe VisionTransformerBackbone "
            "(a VMoEBackbone, a SoftMoEBackbone, a dense ViT), got "
            f"{type(image_encoder).__name__}."
        )
    if image_encoder.pooling is not None:
        raise ValueError(
            f"{owner}: the image encoder must return every token, so it needs "
            f"pooling=None; it has pooling={image_encoder.pooling!r}."
        )
    return image_encoder


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PaliGemmaMoEBackbone(ExportMixin, BuiltinPresetMixin, Backbone):
    """PaliGemma with a pluggable image tower (dense, V-MoE or Soft MoE).

    Image tokens, projected to the decoder width, prefix the text; the
    decoder attends fully over image and prompt tokens and causally over the
    response (`response_mask`). The image encoder's MoE layers add their
    auxiliary losses in training, so they join the language-model loss in
    `fit`.

    Args:
        vocabulary_size: int. Token vocabulary size.
        image_encoder: a `keras_vmoe.models.VMoEBackbone`,
            `SoftMoEBackbone` (or any `VisionTransformerBackbone`) with
            `pooling=None`. Its `image_shape` is the model's image size; its
            output tokens (patches, plus a class token if it has one) are the
            image tokens.
        num_layers: int. Decoder blocks.
        num_query_heads, num_key_value_heads, head_dim: decoder attention.
        hidden_dim: int. Decoder width (the image tokens are projected to it).
        intermediate_dim: int. Width of the decoder's gated MLP.
        query_head_dim_normalize, use_post_ffw_norm, use_post_attention_norm,
        attention_logit_soft_cap, final_logit_soft_cap,
        use_sliding_window_attention, sliding_window_size: Gemma 2 options,
            as in `keras_hub.models.PaliGemmaBackbone`.
        layer_norm_epsilon: float. Epsilon of the final RMSNorm (the decoder
            blocks keep keras-hub's default, as `PaliGemmaBackbone` does).
        dropout: float. Decoder dropout.
        dtype: a dtype or `keras.DTypePolicy` for the decoder and projection
            (the image encoder keeps its own).

    Example:
    >>> from keras_vmoe.models import SoftMoEBackbone
    >>> tower = SoftMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, hidden_dim=32,
    ...     mlp_dim=64, num_heads=2, moe_layers=(1,), num_experts=4,
    ...     slots_per_expert=4, pooling=None)
    >>> backbone = PaliGemmaMoEBackbone(
    ...     vocabulary_size=100, image_encoder=tower, num_layers=2,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=32,
    ...     intermediate_dim=64, head_dim=16)
    >>> tuple(backbone({
    ...     "images": np.zeros((2, 32, 32, 3)),
    ...     "token_ids": np.ones((2, 8), "int32"),
    ...     "padding_mask": np.ones((2, 8), "int32"),
    ...     "response_mask": np.zeros((2, 8), "int32"),
    ... }).shape)  # 16 image tokens, then 8 text tokens.
    (2, 24, 32)
    """

    def __init__(
        self,
        vocabulary_size,
        image_encoder,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        query_head_dim_normalize=True,
        use_post_ffw_norm=False,
        use_post_attention_norm=False,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_sliding_window_attention=False,
        sliding_window_size=4096,
        layer_norm_epsilon=1e-6,
        dropout=0,
        dtype=None,
        **kwargs,
    ):
        owner = type(self).__name__
        image_encoder = check_image_encoder(image_encoder, owner)
        vocabulary_size = check_int("vocabulary_size", vocabulary_size, minimum=1, owner=owner)
        num_layers = check_int("num_layers", num_layers, minimum=1, owner=owner)
        num_query_heads = check_int("num_query_heads", num_query_heads, minimum=1, owner=owner)
        num_key_value_heads = check_int("num_key_value_heads", num_key_value_heads, minimum=1, owner=owner)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                f"{owner}: num_query_heads={num_query_heads} must be a multiple of "
                f"num_key_value_heads={num_key_value_heads} (grouped-query attention)."
            )
        hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1, owner=owner)
        intermediate_dim = check_int("intermediate_dim", intermediate_dim, minimum=1, owner=owner)
        head_dim = check_int("head_dim", head_dim, minimum=1, owner=owner)
        check_float("dropout", dropout, 0.0, 1.0, owner=owner)

        # === Layers ===
        self.image_encoder = image_encoder
        self.image_projection = keras.layers.Dense(hidden_dim, dtype=dtype, name="image_projection")
        # The same layers, arguments and names as keras-hub's PaliGemmaBackbone.
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=True,
            embeddings_initializer=keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="untruncated_normal"
            ),
            dtype=dtype,
            logit_soft_cap=final_logit_soft_cap,
            name="token_embedding",
        )
        self.transformer_layers = [
            PaliGemmaDecoderBlock(
                hidden_dim=hidden_dim,
                intermediate_dim=intermediate_dim,
                head_dim=head_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                query_head_dim_normalize=query_head_dim_normalize,
                use_post_ffw_norm=use_post_ffw_norm,
                use_post_attention_norm=use_post_attention_norm,
                logit_soft_cap=attention_logit_soft_cap,
                # Gemma 2 alternates local and global attention.
                use_sliding_window_attention=use_sliding_window_attention and index % 2 == 0,
                sliding_window_size=sliding_window_size,
                dropout=dropout,
                dtype=dtype,
                name=f"decoder_block_{index}",
            )
            for index in range(num_layers)
        ]
        self.layer_norm = RMSNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_normalization"
        )

        # === Functional model ===
        image_input = keras.Input(shape=image_encoder.image_shape, name="images")
        token_id_input = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask_input = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        response_mask_input = keras.Input(shape=(None,), dtype="int32", name="response_mask")
        image_embeddings = self.embed_images(image_input)  # (B, N, D)
        text_embeddings = self.token_embedding(token_id_input)  # (B, T, D)
        # A Python number, not a tensor computed now: a captured constant
        # becomes a stray input of the ONNX graph tf2onnx writes.
        text_embeddings = text_embeddings * math.sqrt(hidden_dim)
        x = ops.concatenate((image_embeddings, text_embeddings), axis=1)
        for transformer_layer in self.transformer_layers:
            x = transformer_layer(x, padding_mask=padding_mask_input, response_mask=response_mask_input)
        sequence_output = self.layer_norm(x)
        super().__init__(
            inputs={
                "images": image_input,
                "token_ids": token_id_input,
                "padding_mask": padding_mask_input,
                "response_mask": response_mask_input,
            },
            outputs=sequence_output,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.head_dim = head_dim
        self.query_head_dim_normalize = query_head_dim_normalize
        self.use_post_ffw_norm = use_post_ffw_norm
        self.use_post_attention_norm = use_post_attention_norm
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.use_sliding_window_attention = use_sliding_window_attention
        self.sliding_window_size = sliding_window_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        # Image tokens per image: the patches (or merged tokens) and a class
        # token if the encoder has one.
        self.image_sequence_length = int(image_encoder.output.shape[1])

    def embed_images(self, images):
        """(B, H, W, C) pixels -> (B, image_sequence_length, hidden_dim) tokens."""
        return self.image_projection(self.image_encoder(images))

    @property
    def vit_encoder(self):
        """Images to projected image tokens: the name keras-hub's
        `PaliGemmaCausalLM.generate_step` calls on its backbone."""
        return self.embed_images

    @property
    def image_shape(self):
        return self.image_encoder.image_shape

    def with_image_encoder(self, image_encoder):
        """A new backbone with this one's configuration and (copied) weights,
        on another image tower (`keras_vmoe.upcycle` on a VLM calls this with
        the upcycled tower). The projection is kept, so the new tower must
        output the width of the old one; its token count may differ."""
        image_encoder = check_image_encoder(image_encoder, type(self).__name__)
        old_width, new_width = self.image_encoder.output.shape[-1], image_encoder.output.shape[-1]
        if old_width != new_width:
            raise ValueError(
                f"{type(self).__name__}.with_image_encoder: the new image encoder outputs "
                f"width {new_width}, but the image projection takes {old_width}."
            )
        config = self.get_config()
        config["image_encoder"] = image_encoder
        backbone = type(self).from_config(config)
        ours = [self.image_projection, self.token_embedding, *self.transformer_layers, self.layer_norm]
        theirs = [
            backbone.image_projection,
            backbone.token_embedding,
            *backbone.transformer_layers,
            backbone.layer_norm,
        ]
        for source, target in zip(ours, theirs):
            target.set_weights(source.get_weights())  # Copies: JAX donates buffers in fit.
        return backbone

    def get_config(self):
        config = super().get_config()
        config.update(
            vocabulary_size=self.vocabulary_size,
            image_encoder=keras.saving.serialize_keras_object(self.image_encoder),
            num_layers=self.num_layers,
            num_query_heads=self.num_query_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_dim=self.hidden_dim,
            intermediate_dim=self.intermediate_dim,
            head_dim=self.head_dim,
            query_head_dim_normalize=self.query_head_dim_normalize,
            use_post_ffw_norm=self.use_post_ffw_norm,
            use_post_attention_norm=self.use_post_attention_norm,
            attention_logit_soft_cap=self.attention_logit_soft_cap,
            final_logit_soft_cap=self.final_logit_soft_cap,
            use_sliding_window_attention=self.use_sliding_window_attention,
            sliding_window_size=self.sliding_window_size,
            layer_norm_epsilon=self.layer_norm_epsilon,
            dropout=self.dropout,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("image_encoder"), dict):
            config["image_encoder"] = keras.saving.deserialize_keras_object(config["image_encoder"])
        return super().from_config(config)
