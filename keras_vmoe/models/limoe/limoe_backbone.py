"""The LIMoE backbone: one sparse-MoE Transformer for images and text."""

import keras
from keras import ops
from keras_hub.layers import PositionEmbedding as SequencePositionEmbedding
from keras_hub.models import Backbone

from keras_vmoe.export import ExportMixin
from keras_vmoe.layers.embedding import FactorizedPositionEmbedding
from keras_vmoe.layers.embedding import PatchEmbedding
from keras_vmoe.layers.embedding import PositionEmbedding
from keras_vmoe.layers.encoder import MultiHeadAttentionPooling
from keras_vmoe.layers.encoder import SequencePooling
from keras_vmoe.layers.moe import SparseMoE
from keras_vmoe.layers.multimodal_routing import MultimodalTokenChoiceRouter
from keras_vmoe.layers.packing import PackedLayout
from keras_vmoe.models.encoder_stack import check_image_and_patch_size
from keras_vmoe.models.encoder_stack import check_moe_layers
from keras_vmoe.models.encoder_stack import encoder_blocks
from keras_vmoe.models.limoe.sequence_ops import masked_mean
from keras_vmoe.models.limoe.sequence_ops import normalized_embedding
from keras_vmoe.models.limoe.sequence_ops import pad_to_length
from keras_vmoe.models.native_resolution import build_packed_moe
from keras_vmoe.models.native_resolution import check_native_resolution
from keras_vmoe.models.native_resolution import embed_packed
from keras_vmoe.models.native_resolution import packed_inputs
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_int

IMAGE, TEXT, PADDING = 0, 1, -1
IMAGE_POOLINGS = ("gap", "map")


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LIMoEBackbone(ExportMixin, BuiltinPresetMixin, Backbone):
    """LIMoE ("Multimodal Contrastive Learning with LIMoE", arXiv:2206.02770).

    Images (patch embedding + learned 2D position embedding) and text (token
    embedding + learned position embedding) run through one shared stack of
    pre-LayerNorm Transformer blocks. Blocks in `moe_layers` hold a
    `SparseMoE` with a `MultimodalTokenChoiceRouter` (token choice, K = 1,
    Batch Priority Routing by default, as in the paper) that adds the V-MoE
    importance and load losses and LIMoE's per-modality local and global
    entropy losses in training. Each modality is then pooled (images: GAP
    or MAP; text: the mean of its non-padding tokens) and projected by its
    own linear head into a shared space of `embedding_dim`; both embeddings
    are L2-normalised.

    Each modality is encoded and routed on its own (`embed_images`,
    `embed_text`; a pair embeds exactly as its parts do alone). Text padding
    is masked out of attention and not routed. With
    `route_pairs_together=True` an image's patches and its caption's tokens
    form one sequence instead: attention stays within a modality (a
    block-diagonal mask), while the MoE layers route the pair's tokens in one
    group, so the modalities compete for the same expert slots. Do not train
    contrastively that way: the capacity competition leaks which caption
    belongs to which image (measured on CIFAR-10: the training loss fell
    below what same-class captions allow while zero-shot accuracy stayed at
    chance, 0.10; routed apart, the same recipe reached 0.73).

    Choices where the paper is not explicit: the text is pooled by a masked
    mean (the paper's text tower follows LiT), the projections have no bias,
    and the entropy losses are weighted 0.01 each with a global-entropy
    threshold of log(E / 2) unless `router_options` says otherwise.

    Args:
        image_shape: (height, width, channels).
        patch_size: int or (int, int).
        vocabulary_size: int. Text tokens.
        max_text_length: int. Text positions; longer token sequences are an
            error (the preprocessor truncates to it).
        num_layers, hidden_dim, mlp_dim, num_heads: the shared Transformer.
        embedding_dim: int. The shared embedding space.
        moe_layers: block indices whose MLP is a `SparseMoE`.
        num_experts, num_selected_experts, capacity_factor, group_size,
        batch_priority: routing, as `VMoEBackbone`.
        router_options: dict of further router arguments
            (`local_entropy_weights`, `global_entropy_weights`,
            `global_entropy_thresholds`, `importance_loss_weight`,
            `load_loss_weight`, `noise_std`, ...).
        image_pooling: `"gap"` or `"map"`.
        dropout_rate, approximate_gelu, layer_norm_epsilon, dtype: as
            `VisionTransformerBackbone`.
        route_pairs_together: bool. Route an image and its caption in one
            group (see above); default False.
        parallel_block, use_bias: ViT-22B's block options, as
            `VisionTransformerBackbone`.
        native_resolution: bool. NaViT on the image side: images come as
            packed sequences `{"patches", "positions", "segment_ids"}` (see
            `keras_vmoe.layers.SequencePacker`) and each image slot's caption
            as `token_ids` and `padding_mask` of shape (batch,
            max_images_per_sequence, length) (all-False masks on empty
            slots); both embeddings come out (batch, max_images_per_sequence,
            embedding_dim), zeros on empty slots. Attention, pooling and
            routing stay within each image, as the native-resolution
            `VisionTransformerBackbone`; `position_embedding` (default
            `"factorized"`), `max_images_per_sequence`, `max_image_tokens`
            and `packed_routing` are its options.
        modality_expert_pools: bool. Split the experts of every MoE layer
            into an image pool (the first E / 2) and a text pool (the last
            E / 2): image tokens route only to image experts and text tokens
            only to text experts, as VL-MoE's vision and language experts
            (`MultimodalTokenChoiceRouter(modality_expert_pools=True)`).
            Default False: both modalities share every expert, as in LIMoE.

    Example:
    >>> backbone = LIMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, vocabulary_size=100,
    ...     max_text_length=8, num_layers=2, hidden_dim=32, mlp_dim=64,
    ...     num_heads=2, embedding_dim=16, moe_layers=(1,), num_experts=4)
    >>> outputs = backbone({
    ...     "images": np.zeros((2, 32, 32, 3)),
    ...     "token_ids": np.ones((2, 8), "int32"),
    ...     "padding_mask": np.ones((2, 8), "bool")})
    >>> tuple(outputs["image_embeddings"].shape), tuple(outputs["text_embeddings"].shape)
    ((2, 16), (2, 16))
    """

    def __init__(
        self,
        image_shape,
        patch_size,
        vocabulary_size,
        max_text_length,
        num_layers,
        hidden_dim,
        mlp_dim,
        num_heads,
        embedding_dim,
        moe_layers=(),
        num_experts=8,
        num_selected_experts=1,
        capacity_factor=1.0,
        group_size=None,
        batch_priority=True,
        router_options=None,
        image_pooling="gap",
        dropout_rate=0.0,
        approximate_gelu=True,
        layer_norm_epsilon=1e-6,
        route_pairs_together=False,
        modality_expert_pools=False,
        parallel_block=False,
        use_bias=True,
        native_resolution=False,
        position_embedding=None,
        max_images_per_sequence=None,
        max_image_tokens=None,
        packed_routing="image",
        dtype=None,
        **kwargs,
    ):
        owner = "LIMoEBackbone"
        image_shape, patch_size = check_image_and_patch_size(image_shape, patch_size, owner)
        vocabulary_size = check_int("vocabulary_size", vocabulary_size, minimum=1, owner=owner)
        max_text_length = check_int("max_text_length", max_text_length, minimum=1, owner=owner)
        num_layers = check_int("num_layers", num_layers, minimum=1, owner=owner)
        embedding_dim = check_int("embedding_dim", embedding_dim, minimum=1, owner=owner)
        check_choice("image_pooling", image_pooling, IMAGE_POOLINGS, owner=owner)
        moe_layers = check_moe_layers(moe_layers, num_layers, owner)
        router_options = dict(router_options or {})
        modality_expert_pools = bool(modality_expert_pools)
        if modality_expert_pools and num_experts % 2:
            raise ValueError(
                f"{owner}: modality_expert_pools splits the experts into an image and a text pool, "
                f"so num_experts must be even, got {num_experts}."
            )
        grid_size = (image_shape[0] // patch_size[0], image_shape[1] // patch_size[1])
        native_resolution = bool(native_resolution)
        if native_resolution:
            if route_pairs_together:
                raise ValueError(
                    f"{owner}: native_resolution=True embeds images and captions apart; "
                    "route_pairs_together must be False."
                )
            position_embedding = "factorized" if position_embedding is None else position_embedding
            max_images_per_sequence, max_image_tokens = check_native_resolution(
                owner, position_embedding, max_images_per_sequence, max_image_tokens, packed_routing,
                grid_size, 0, 0, None, 1,
            )  # fmt: skip

        # === Layers ===
        self.patch_embedding = PatchEmbedding(hidden_dim, patch_size, dtype=dtype, name="patch_embedding")
        if native_resolution:
            self.packed_layout = PackedLayout(
                max_images_per_sequence, max_image_tokens, dtype=dtype, name="packed_layout"
            )
            self.image_position_embedding = FactorizedPositionEmbedding(
                position_embedding, grid_size, max_images_per_sequence, dtype=dtype,
                name="image_position_embedding",
            )  # fmt: skip
        else:
            self.image_position_embedding = PositionEmbedding(
                position_embedding or "learned", grid_size, dtype=dtype, name="image_position_embedding"
            )
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size,
            hidden_dim,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=hidden_dim**-0.5),
            dtype=dtype,
            name="token_embedding",
        )
        self.text_position_embedding = SequencePositionEmbedding(
            max_text_length, dtype=dtype, name="text_position_embedding"
        )
        self.embedding_dropout = keras.layers.Dropout(dropout_rate, dtype=dtype, name="embedding_dropout")

        def make_moe(index, **options):
            router = MultimodalTokenChoiceRouter(
                num_experts,
                modalities=("image", "text"),
                num_selected_experts=num_selected_experts,
                capacity_factor=capacity_factor,
                batch_priority=batch_priority,
                modality_expert_pools=modality_expert_pools,
                name="router",
                **router_options,
            )
            return SparseMoE(
                num_experts,
                mlp_dim,
                router=router,
                group_size=group_size,
                approximate_gelu=approximate_gelu,
                dropout_rate=dropout_rate,
                dtype=dtype,
                name="moe",
                **options,
            )

        # One stack for both modalities, built as every encoder of the zoo is.
        self.blocks = encoder_blocks(
            num_layers,
            num_heads,
            mlp_dim,
            moe_layers,
            make_moe,
            approximate_gelu,
            dropout_rate,
            use_bias=use_bias,
            dtype=dtype,
            layer_norm_epsilon=layer_norm_epsilon,
            parallel_block=bool(parallel_block),
        )
        self.encoder_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="encoder_norm"
        )
        if image_pooling == "map":
            self.image_pooling_layer = MultiHeadAttentionPooling(
                num_heads,
                mlp_dim,
                False,
                approximate_gelu,
                layer_norm_epsilon,
                use_bias=bool(use_bias),
                dtype=dtype,
                name="image_pooling",
            )
        else:
            self.image_pooling_layer = SequencePooling("gap", dtype=dtype, name="image_pooling")
        self.image_projection = keras.layers.Dense(
            embedding_dim, use_bias=False, dtype=dtype, name="image_projection"
        )
        self.text_projection = keras.layers.Dense(
            embedding_dim, use_bias=False, dtype=dtype, name="text_projection"
        )
        self.image_shape = image_shape
        self.num_image_tokens = grid_size[0] * grid_size[1]
        self.max_text_length = max_text_length
        self.route_pairs_together = bool(route_pairs_together)
        self.modality_expert_pools = modality_expert_pools
        self.native_resolution = native_resolution
        self.max_images_per_sequence = max_images_per_sequence
        self.packed_routing = packed_routing
        if native_resolution:
            for index in moe_layers:
                build_packed_moe(
                    self.blocks[index], index, packed_routing, max_image_tokens, hidden_dim, owner
                )

        # === Functional model ===
        if native_resolution:
            images = packed_inputs(patch_size, image_shape[-1])
            text_shape = (max_images_per_sequence, None)
        else:
            images, text_shape = keras.Input(shape=image_shape, name="images"), (None,)
        token_ids = keras.Input(shape=text_shape, dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=text_shape, dtype="bool", name="padding_mask")
        image_embeddings, text_embeddings = self.encode(images, token_ids, padding_mask)
        image_inputs = images if native_resolution else {"images": images}
        super().__init__(
            inputs={**image_inputs, "token_ids": token_ids, "padding_mask": padding_mask},
            outputs={"image_embeddings": image_embeddings, "text_embeddings": text_embeddings},
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.patch_size = patch_size
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.num_heads = num_heads
        self.embedding_dim = embedding_dim
        self.moe_layers = moe_layers
        self.num_experts = num_experts
        self.num_selected_experts = num_selected_experts
        self.capacity_factor = capacity_factor
        self.group_size = group_size
        self.batch_priority = batch_priority
        self.router_options = router_options
        self.image_pooling = image_pooling
        self.dropout_rate = dropout_rate
        self.approximate_gelu = approximate_gelu
        self.layer_norm_epsilon = layer_norm_epsilon
        self.parallel_block = bool(parallel_block)
        self.use_bias = bool(use_bias)
        self.position_embedding = position_embedding
        self.max_image_tokens = max_image_tokens

    def encode(self, images=None, token_ids=None, padding_mask=None, training=None):
        """Embeds images, texts, or image-text pairs (one sequence per pair).

        Returns (image_embeddings, text_embeddings), each (batch,
        embedding_dim) and L2-normalised, or None for a missing modality.
        With `native_resolution=True`, `images` is a packed batch and both
        are (batch, max_images_per_sequence, embedding_dim), one per slot.
        """
        if images is None and token_ids is None:
            raise ValueError("LIMoEBackbone.encode: give images, token_ids, or both.")
        if self.native_resolution:
            return (
                None if images is None else self.encode_packed_images(images, training),
                None if token_ids is None else self.encode_slot_text(token_ids, padding_mask, training),
            )
        if images is not None and token_ids is not None and not self.route_pairs_together:
            return (
                self.encode(images=images, training=training)[0],
                self.encode(token_ids=token_ids, padding_mask=padding_mask, training=training)[1],
            )
        x, token_modalities, attention_mask = self.input_tokens(images, token_ids, padding_mask)
        x = self.run_blocks(x, training, attention_mask=attention_mask, token_modalities=token_modalities)
        image_embeddings = text_embeddings = None
        num_image_tokens = 0
        if images is not None:
            num_image_tokens = self.num_image_tokens
            pooled = self.image_pooling_layer(x[:, :num_image_tokens])
            image_embeddings = normalized_embedding(self.image_projection(pooled))
        if token_ids is not None:
            pooled = masked_mean(
                x[:, num_image_tokens:], ops.equal(token_modalities[:, num_image_tokens:], TEXT)
            )
            text_embeddings = normalized_embedding(self.text_projection(pooled))
        return image_embeddings, text_embeddings

    def run_blocks(self, x, training=None, **block_inputs):
        """The shared stack: embedding dropout, the blocks (with
        `block_inputs`), the final LayerNorm."""
        x = self.embedding_dropout(x, training=training)
        for block in self.blocks:
            x = block(x, training=training, **block_inputs)
        return self.encoder_norm(x)

    def encode_packed_images(self, images, training=None):
        """A packed batch (`native_resolution=True`) -> (batch, N,
        embedding_dim), one unit vector per image slot (zeros if empty)."""
        x, layout = embed_packed(
            images, self.packed_layout, self.patch_embedding, self.image_position_embedding
        )
        segment_ids = images["segment_ids"]
        groups = {"image_groups": layout} if self.packed_routing == "image" else {}
        modalities = ops.where(segment_ids > 0, IMAGE, PADDING)
        x = self.run_blocks(x, training, token_modalities=modalities, segment_ids=segment_ids, **groups)
        pooled = self.image_pooling_layer(x, segment_ids=segment_ids, max_images=self.max_images_per_sequence)
        return normalized_embedding(self.image_projection(pooled))

    def encode_slot_text(self, token_ids, padding_mask=None, training=None):
        """(batch, N, length) captions, one per image slot -> (batch, N,
        embedding_dim); an all-padding caption gives zeros."""
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        self.check_text_length(token_ids.shape[-1])
        flat_ids, flat_mask = (pad_to_length(x, self.max_text_length) for x in (token_ids, padding_mask))
        x, token_modalities, attention_mask = self.input_tokens(None, flat_ids, flat_mask)
        x = self.run_blocks(x, training, attention_mask=attention_mask, token_modalities=token_modalities)
        pooled = masked_mean(x, ops.equal(token_modalities, TEXT))
        embeddings = normalized_embedding(self.text_projection(pooled))
        return ops.reshape(embeddings, (-1, self.max_images_per_sequence, embeddings.shape[-1]))

    def check_text_length(self, length):
        if length is not None and length > self.max_text_length:
            raise ValueError(
                f"LIMoEBackbone: token_ids have {length} positions but the model has "
                f"max_text_length={self.max_text_length}; truncate the text (the "
                "LIMoEPreprocessor does) or build a model with longer positions."
            )

    def input_tokens(self, images=None, token_ids=None, padding_mask=None):
        """What enters the first block, for images, texts or pairs (one sequence each).

        Returns (tokens (B, T, D), token_modalities (B, T) int: IMAGE, TEXT
        or PADDING, attention_mask (B, T, T) bool), image tokens first.
        """
        parts, modalities = [], []
        if images is not None:
            image_tokens = self.image_position_embedding(self.patch_embedding(images))
            parts.append(image_tokens)
            modalities.append(ops.full_like(image_tokens[..., 0], IMAGE, dtype="int32"))
        if token_ids is not None:
            length = token_ids.shape[1]
            self.check_text_length(length)
            if padding_mask is None:
                padding_mask = ops.ones_like(token_ids, dtype="bool")
            if length is None:
                # A graph traced for any text length (a SavedModel signature,
                # a tf.data pipeline): pad to max_text_length, so that the MoE
                # layers know how many tokens they route. Padding is masked.
                token_ids, padding_mask = (
                    pad_to_length(x, self.max_text_length) for x in (token_ids, padding_mask)
                )
            text_tokens = self.token_embedding(token_ids)
            text_tokens = text_tokens + self.text_position_embedding(text_tokens)
            parts.append(text_tokens)
            modalities.append(ops.where(ops.cast(padding_mask, "bool"), TEXT, PADDING))
        x = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)
        token_modalities = modalities[0] if len(modalities) == 1 else ops.concatenate(modalities, axis=1)
        # Each token attends to the real tokens of its own modality (padding
        # to padding, so that no row is empty).
        attention_mask = ops.equal(token_modalities[:, :, None], token_modalities[:, None, :])
        return x, token_modalities, attention_mask

    def embed_images(self, images, training=False):
        """(batch, H, W, C) pixels -> (batch, embedding_dim) unit vectors."""
        return self.encode(images=images, training=training)[0]

    def embed_text(self, token_ids, padding_mask=None, training=False):
        """(batch, length) token ids -> (batch, embedding_dim) unit vectors."""
        return self.encode(token_ids=token_ids, padding_mask=padding_mask, training=training)[1]

    @property
    def encoder_blocks(self):
        """The Transformer blocks, in order (`blocks`)."""
        return list(self.blocks)

    @property
    def moe_blocks(self):
        """The same as `moe_mlps` (the name of keras_vmoe 0.1)."""
        return self.moe_mlps

    @property
    def moe_mlps(self):
        """The MoE layers that stand in the MLP place of the blocks in
        `moe_layers` (indices), in block order; `encoder_blocks` are the blocks."""
        return [self.blocks[index].mlp for index in self.moe_layers]

    def get_config(self):
        config = super().get_config()
        config.update(
            image_shape=self.image_shape,
            patch_size=self.patch_size,
            vocabulary_size=self.vocabulary_size,
            max_text_length=self.max_text_length,
            num_layers=self.num_layers,
            hidden_dim=self.hidden_dim,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            embedding_dim=self.embedding_dim,
            moe_layers=self.moe_layers,
            num_experts=self.num_experts,
            num_selected_experts=self.num_selected_experts,
            capacity_factor=self.capacity_factor,
            group_size=self.group_size,
            batch_priority=self.batch_priority,
            router_options=self.router_options,
            image_pooling=self.image_pooling,
            dropout_rate=self.dropout_rate,
            approximate_gelu=self.approximate_gelu,
            layer_norm_epsilon=self.layer_norm_epsilon,
            route_pairs_together=self.route_pairs_together,
        )
        if self.modality_expert_pools:  # Configs of shared-expert models stay as before.
            config["modality_expert_pools"] = True
        # Configs without these options load as before.
        config.update({"parallel_block": True} if self.parallel_block else {})
        config.update({} if self.use_bias else {"use_bias": False})
        if self.position_embedding is not None:
            config["position_embedding"] = self.position_embedding
        if self.native_resolution:
            config.update(
                native_resolution=True,
                max_images_per_sequence=self.max_images_per_sequence,
                max_image_tokens=self.max_image_tokens,
                packed_routing=self.packed_routing,
            )
        return config
