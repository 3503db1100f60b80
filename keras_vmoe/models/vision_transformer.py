"""The one Vision Transformer backbone every family configures.

`VisionTransformerBackbone` builds the functional graph of vmoe's
`VisionTransformerMoe`; a family (V-MoE, Soft MoE) only says which MoE layer
goes into the blocks listed in `moe_layers` (`moe_factory`), and which named
architectures it knows (`architecture_config`, `architectures`). The blocks
themselves come from one place, `encoder_blocks`, which LIMoE's shared
image-text stack uses too. Any backbone can merge its tokens with a
`PatchMerger` between two blocks (`patch_merger=`).
"""

import keras
from keras_hub.models import Backbone

from keras_vmoe.export import ExportMixin
from keras_vmoe.layers.embedding import POSITION_EMBEDDINGS
from keras_vmoe.layers.embedding import ClassToken
from keras_vmoe.layers.embedding import PatchEmbedding
from keras_vmoe.layers.embedding import PositionEmbedding
from keras_vmoe.layers.embedding import RegisterTokens
from keras_vmoe.layers.encoder import POOLINGS
from keras_vmoe.layers.encoder import MultiHeadAttentionPooling
from keras_vmoe.layers.encoder import SequencePooling
from keras_vmoe.layers.ensemble import EnsembleRepeat
from keras_vmoe.layers.moe import MoELayer
from keras_vmoe.layers.patch_merger import PatchMerger
from keras_vmoe.models.encoder_stack import check_image_and_patch_size
from keras_vmoe.models.encoder_stack import check_moe_layers
from keras_vmoe.models.encoder_stack import check_patch_merger
from keras_vmoe.models.encoder_stack import encoder_blocks
from keras_vmoe.models.encoder_stack import rescale_group_size
from keras_vmoe.models.native_resolution import build_packed_moe
from keras_vmoe.models.native_resolution import check_native_resolution
from keras_vmoe.models.native_resolution import packed_embedding
from keras_vmoe.models.native_resolution import packed_inputs
from keras_vmoe.models.preset_mixin import BuiltinPresetMixin
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int


@keras.saving.register_keras_serializable(package="keras_vmoe")
class VisionTransformerBackbone(ExportMixin, BuiltinPresetMixin, Backbone):
    """Vision Transformer encoder whose blocks take their MLP as a layer.

    Subclasses pass `moe_mlp`, a function `(block_index) -> layer` used for the
    blocks in `moe_layers` (see `moe_factory`); other blocks get a dense
    `Mlp`. A family's named architectures: `from_architecture(name)`, the
    names in `architectures`.

    With `patch_merger=dict(after_block=b, num_tokens=M)` a
    `keras_vmoe.layers.PatchMerger` (layer name `"patch_merger"`) follows
    block `b`, and blocks `b + 1` onwards run on M merged tokens per image
    (the paper: M = 8 after the middle block). The class token, if any, is
    not merged: it passes through the merger unchanged, ahead of the M merged
    tokens, so blocks after the merger see 1 + M tokens and every pooling
    keeps its meaning (`"token"` reads the class token, `"gap"` averages the
    merged tokens, `"map"` attends to all). MoE layers after the merger route
    the merged tokens: with `group_size=None` one image per group; with a
    `group_size` (tokens of the unmerged sequence, a whole number of images)
    groups of the same number of images. A Soft MoE sizes its slots from the
    tokens its group holds.

    Args:
        image_shape: (height, width, channels).
        patch_size: int or (int, int); must divide the image size.
        num_layers, hidden_dim, mlp_dim, num_heads: the Transformer's size.
        pooling: `"token"`, `"gap"`, `"map"` or None. With None the backbone
            returns all tokens, (batch, tokens, hidden_dim); otherwise one
            vector per image.
        use_class_token: bool or None. Prepend a class token. None: only with
            `pooling="token"`.
        position_embedding: `"learned"`, `"sincos2d"` or None.
        attention_qk_norm: bool. LayerNorm on queries and keys.
        representation_size: int or None. A Dense + tanh "pre-logits" layer
            after pooling (vmoe's `representation_size`).
        dropout_rate, attention_dropout_rate: floats.
        approximate_gelu: bool. tanh-approximate GELU (vmoe) or exact (keras-hub).
        layer_norm_epsilon: float.
        layer_scale_init: None, or the initial value of LayerScale on every
            block's attention and MLP branches (DINOv2 style).
        num_register_tokens: int >= 0. Learned register tokens inserted after
            the class token, after the position embedding (DINOv2 with
            registers); pooling and the PatchMerger skip them like the class
            token.
        moe_layers: indices of the blocks whose MLP is a MoE layer.
        patch_merger: None, or `dict(after_block=b, num_tokens=M)`: merge the
            patch tokens into M after block b (0 <= b <= num_layers - 2,
            M <= the number of patches).
        ensemble_size: int. E^3's M (a family whose MoE layers route
            ensemble members, `VMoEBackbone`): every image is repeated M
            times before the first MoE block (`EnsembleRepeat`), so the
            output has M rows per image, row b * M + m = member m of image b.
        parallel_block: bool. ViT-22B's block: attention and MLP in parallel
            from one LayerNorm.
        use_bias: bool. False: no biases in the attention and MLP (or
            expert) projections (ViT-22B); the LayerNorms keep theirs.
        native_resolution: bool. NaViT: the backbone takes packed sequences,
            `{"patches", "positions", "segment_ids"}` (see
            `keras_vmoe.layers.SequencePacker`), of images at their own
            resolution and aspect ratio, up to `image_shape` (which sizes the
            position tables). Attention stays within each image, pooling is
            per image, (batch, max_images_per_sequence, dim) (zeros for empty
            slots), and padding is never routed. Needs a `position_embedding`
            of `"factorized"`, `"factorized_fractional"`, `"sincos2d"` or None.
        max_images_per_sequence: int. N, the image slots of a sequence.
        max_image_tokens: int or None. P, the most tokens one image may
            have (its class token included); None: the whole grid of
            `image_shape`.
        packed_routing: `"image"` (default): each image is its own routing
            group, padded to P tokens, so its outputs never depend on the
            other images of its sequence (Soft MoE: its own slots);
            `"sequence"` (token-choice layers only): one group per sequence,
            where images compete for capacity as images in a group do.
        dtype: a dtype or `keras.DTypePolicy` (e.g. `"mixed_bfloat16"`).
    """

    def __init__(
        self,
        image_shape,
        patch_size,
        num_layers,
        hidden_dim,
        mlp_dim,
        num_heads,
        pooling="token",
        use_class_token=None,
        position_embedding="learned",
        attention_qk_norm=False,
        representation_size=None,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        approximate_gelu=True,
        layer_norm_epsilon=1e-6,
        layer_scale_init=None,
        num_register_tokens=0,
        moe_layers=(),
        moe_mlp=None,
        patch_merger=None,
        ensemble_size=1,
        parallel_block=False,
        use_bias=True,
        native_resolution=False,
        max_images_per_sequence=None,
        max_image_tokens=None,
        packed_routing="image",
        dtype=None,
        **kwargs,
    ):
        owner = type(self).__name__
        image_shape, patch_size = check_image_and_patch_size(image_shape, patch_size, owner)
        num_layers = check_int("num_layers", num_layers, minimum=1, owner=owner)
        hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1, owner=owner)
        mlp_dim = check_int("mlp_dim", mlp_dim, minimum=1, owner=owner)
        num_heads = check_int("num_heads", num_heads, minimum=1, owner=owner)
        if hidden_dim % num_heads:
            raise ValueError(f"{owner}: hidden_dim={hidden_dim} must be divisible by num_heads={num_heads}.")
        check_choice("pooling", pooling, POOLINGS, owner=owner)
        if not native_resolution:
            check_choice("position_embedding", position_embedding, POSITION_EMBEDDINGS, owner=owner)
        if use_class_token is None:
            use_class_token = pooling == "token"
        if pooling == "token" and not use_class_token:
            raise ValueError(f"{owner}: pooling='token' needs use_class_token=True.")
        if representation_size is not None:
            check_int("representation_size", representation_size, minimum=1, owner=owner)
            if pooling is None:
                raise ValueError(f"{owner}: representation_size needs a pooling.")
        check_float("dropout_rate", dropout_rate, 0.0, 1.0, owner=owner)
        check_float("attention_dropout_rate", attention_dropout_rate, 0.0, 1.0, owner=owner)
        moe_layers = check_moe_layers(moe_layers, num_layers, owner)
        if moe_layers and moe_mlp is None:
            raise ValueError(f"{owner}: moe_layers given but this backbone has no MoE layer type.")
        ensemble_size = check_int("ensemble_size", ensemble_size, minimum=1, owner=owner)
        if ensemble_size > 1 and not moe_layers:
            raise ValueError(
                f"{owner}: ensemble_size={ensemble_size} needs MoE layers (the members differ only in "
                "their experts); give moe_layers."
            )
        grid_size = (image_shape[0] // patch_size[0], image_shape[1] // patch_size[1])
        num_register_tokens = check_int("num_register_tokens", num_register_tokens, minimum=0, owner=owner)
        num_prefix_tokens = int(bool(use_class_token)) + num_register_tokens
        num_patches = grid_size[0] * grid_size[1]
        patch_merger = check_patch_merger(patch_merger, num_layers, num_patches, owner)
        native_resolution = bool(native_resolution)
        if native_resolution:
            max_images_per_sequence, max_image_tokens = check_native_resolution(
                owner,
                position_embedding,
                max_images_per_sequence,
                max_image_tokens,
                packed_routing,
                grid_size,
                num_prefix_tokens,
                num_register_tokens,
                patch_merger,
                ensemble_size,
            )

        # === Functional model ===
        packed = {}  # The packed sequences' extra arguments of blocks and pooling.
        if native_resolution:
            images = packed_inputs(patch_size, image_shape[-1])
            x, layout = packed_embedding(
                images,
                hidden_dim,
                patch_size,
                grid_size,
                position_embedding,
                use_class_token,
                max_images_per_sequence,
                max_image_tokens,
                dtype,
            )
            packed = {"segment_ids": images["segment_ids"]}
        else:
            images = keras.Input(shape=image_shape, name="images")
            x = PatchEmbedding(hidden_dim, patch_size, dtype=dtype, name="patch_embedding")(images)
            if use_class_token:
                x = ClassToken(dtype=dtype, name="class_token")(x)
            x = PositionEmbedding(
                position_embedding,
                grid_size,
                int(bool(use_class_token)),
                dtype=dtype,
                name="position_embedding",
            )(x)
        if num_register_tokens:
            x = RegisterTokens(
                num_register_tokens, int(bool(use_class_token)), dtype=dtype, name="register_tokens"
            )(x)
        x = keras.layers.Dropout(dropout_rate, dtype=dtype, name="embedding_dropout")(x)
        blocks = encoder_blocks(
            num_layers,
            num_heads,
            mlp_dim,
            moe_layers,
            moe_mlp,
            approximate_gelu,
            dropout_rate,
            dtype=dtype,
            attention_qk_norm=attention_qk_norm,
            attention_dropout_rate=attention_dropout_rate,
            layer_norm_epsilon=layer_norm_epsilon,
            layer_scale_init=layer_scale_init,
            use_bias=use_bias,
            **({"parallel_block": True} if parallel_block else {}),
        )
        for index, block in enumerate(blocks):
            if native_resolution:
                build_packed_moe(block, index, packed_routing, max_image_tokens, hidden_dim, owner)
            if patch_merger and index > patch_merger["after_block"] and index in moe_layers:
                rescale_group_size(
                    block.mlp,
                    num_prefix_tokens + num_patches,
                    num_prefix_tokens + patch_merger["num_tokens"],
                    owner,
                )
            if index in moe_layers and getattr(block.mlp, "ensemble_size", 1) != ensemble_size:
                raise ValueError(
                    f"{owner}: ensemble_size={ensemble_size}, but the MoE layer of block {index} "
                    f"({type(block.mlp).__name__}) routes ensembles of "
                    f"{getattr(block.mlp, 'ensemble_size', 1)}; E^3 ensembles need the V-MoE's "
                    "SparseMoE (VMoEBackbone(ensemble_size=...))."
                )
            if ensemble_size > 1 and index == moe_layers[0]:
                x = EnsembleRepeat(ensemble_size, dtype=dtype, name="ensemble_repeat")(x)
            groups = {"image_groups": layout} if native_resolution and packed_routing == "image" else {}
            x = block(x, **packed, **groups)
            if patch_merger and index == patch_merger["after_block"]:
                x = PatchMerger(
                    patch_merger["num_tokens"],
                    num_prefix_tokens,
                    layer_norm_epsilon,
                    dtype=dtype,
                    name="patch_merger",
                )(x)
        x = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=dtype, name="encoder_norm")(x)
        if pooling == "map":
            x = MultiHeadAttentionPooling(
                num_heads,
                mlp_dim,
                attention_qk_norm,
                approximate_gelu,
                layer_norm_epsilon,
                use_bias=use_bias,
                dtype=dtype,
                name="map_pooling",
            )(x, **packed, **({"max_images": max_images_per_sequence} if packed else {}))
        elif pooling is not None:
            pool = SequencePooling(pooling, num_prefix_tokens, dtype=dtype, name="pooling")
            if packed:
                x = pool(x, prefix_mask=layout["prefix_mask"], max_images=max_images_per_sequence, **packed)
            else:
                x = pool(x)
        if representation_size is not None:
            x = keras.layers.Dense(representation_size, activation="tanh", dtype=dtype, name="pre_logits")(x)
        super().__init__(inputs=images, outputs=x, dtype=dtype, **kwargs)

        # === Config ===
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.num_heads = num_heads
        self.pooling = pooling
        self.use_class_token = bool(use_class_token)
        self.position_embedding = position_embedding
        self.attention_qk_norm = bool(attention_qk_norm)
        self.representation_size = representation_size
        self.dropout_rate = dropout_rate
        self.attention_dropout_rate = attention_dropout_rate
        self.approximate_gelu = bool(approximate_gelu)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.layer_scale_init = layer_scale_init
        self.num_register_tokens = num_register_tokens
        self.moe_layers = moe_layers
        self.patch_merger = patch_merger
        self.ensemble_size = ensemble_size
        self.parallel_block = bool(parallel_block)
        self.use_bias = bool(use_bias)
        self.native_resolution = native_resolution
        self.max_images_per_sequence = max_images_per_sequence
        self.max_image_tokens = max_image_tokens
        self.packed_routing = packed_routing

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """keras-hub's `from_preset`; a family's backbone (`VMoEBackbone`,
        `SoftMoEBackbone`) also loads a dense ViT preset (such as
        `vit_tiny_cifar10`, saved with the dense class since 0.2) as that
        family's backbone without MoE layers: the same weights and outputs."""
        try:
            return super().from_preset(preset, *args, **kwargs)
        except ValueError as error:
            if cls is VisionTransformerBackbone or "type `VisionTransformerBackbone`" not in str(error):
                raise
        dense = VisionTransformerBackbone.from_preset(preset, *args, **kwargs)
        config = dense.get_config()
        config.pop("name", None)
        backbone = cls(**config)
        backbone.set_weights(dense.get_weights())
        return backbone

    # A family's named architectures: `architecture_config(name, image_shape)`
    # -> backbone arguments, and the names it knows.
    architecture_config = None
    architectures = ()

    @classmethod
    def from_architecture(cls, name, image_shape=(224, 224, 3), **overrides):
        """Builds a named architecture of the family (`cls.architectures`)
        with random weights; `overrides` replace any argument (e.g.
        `patch_merger=dict(after_block=3, num_tokens=16)`)."""
        if cls.architecture_config is None:
            raise ValueError(f"{cls.__name__} has no named architectures; see its subclasses.")
        config = cls.architecture_config(name, image_shape)
        config.update(overrides)
        return cls(**config)

    @property
    def encoder_blocks(self):
        return [self.get_layer(f"encoder_block_{i}") for i in range(self.num_layers)]

    @property
    def moe_blocks(self):
        """The same as `moe_mlps` (the name of keras_vmoe 0.1)."""
        return self.moe_mlps

    @property
    def moe_mlps(self):
        """The MoE layers that stand in the MLP place of the blocks in
        `moe_layers` (indices), in block order; `encoder_blocks` are the blocks."""
        return [self.get_layer(f"encoder_block_{i}").mlp for i in self.moe_layers]

    @property
    def patch_merger_layer(self):
        """The `PatchMerger` layer, or None without `patch_merger`."""
        return self.get_layer("patch_merger") if self.patch_merger else None

    @property
    def num_prefix_tokens(self):
        return int(self.use_class_token) + self.num_register_tokens

    @property
    def output_dim(self):
        return self.representation_size or self.hidden_dim

    def get_config(self):
        config = super().get_config()
        config.update(
            image_shape=self.image_shape,
            patch_size=self.patch_size,
            num_layers=self.num_layers,
            hidden_dim=self.hidden_dim,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            pooling=self.pooling,
            use_class_token=self.use_class_token,
            position_embedding=self.position_embedding,
            attention_qk_norm=self.attention_qk_norm,
            representation_size=self.representation_size,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            approximate_gelu=self.approximate_gelu,
            layer_norm_epsilon=self.layer_norm_epsilon,
            layer_scale_init=self.layer_scale_init,
            num_register_tokens=self.num_register_tokens,
            moe_layers=self.moe_layers,
            patch_merger=self.patch_merger,
        )
        if self.ensemble_size > 1:  # Configs of other models stay as before.
            config["ensemble_size"] = self.ensemble_size
        if self.parallel_block:
            config["parallel_block"] = True
        if not self.use_bias:
            config["use_bias"] = False
        if self.native_resolution:
            config.update(
                native_resolution=True,
                max_images_per_sequence=self.max_images_per_sequence,
                max_image_tokens=self.max_image_tokens,
                packed_routing=self.packed_routing,
            )
        return config


def collect_moe_layers(model):
    """Every MoE layer inside `model`, in the order Keras tracks them."""
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, MoELayer)]
