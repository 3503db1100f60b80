"""The native-resolution (NaViT) input of `VisionTransformerBackbone`:
packed sequences instead of square images (`keras_vmoe.layers.packing`).

    {"patches", "positions", "segment_ids"} -> PatchEmbedding (the same
    kernel as on images) -> ClassToken on each image's reserved slot ->
    FactorizedPositionEmbedding -> blocks (attention within each image, one
    routing group per image) -> per-image pooling, (batch, N, dim)
"""

import keras

from keras_vmoe.layers.embedding import PACKED_POSITION_EMBEDDINGS
from keras_vmoe.layers.embedding import ClassToken
from keras_vmoe.layers.embedding import FactorizedPositionEmbedding
from keras_vmoe.layers.embedding import PatchEmbedding
from keras_vmoe.layers.packing import PackedLayout
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_int

PACKED_ROUTING = ("image", "sequence")


def check_native_resolution(
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
):
    """Validates a native-resolution backbone's options; returns
    (max_images_per_sequence, max_image_tokens)."""
    check_choice("position_embedding", position_embedding, PACKED_POSITION_EMBEDDINGS, owner=owner)
    check_choice("packed_routing", packed_routing, PACKED_ROUTING, owner=owner)
    if max_images_per_sequence is None:
        raise ValueError(
            f"{owner}: native_resolution=True needs max_images_per_sequence, the image slots of "
            "one packed sequence (the pooled output is (batch, max_images_per_sequence, dim))."
        )
    max_images = check_int("max_images_per_sequence", max_images_per_sequence, minimum=1, owner=owner)
    most = num_prefix_tokens + grid_size[0] * grid_size[1]
    if max_image_tokens is None:
        max_image_tokens = most
    max_image_tokens = check_int(
        "max_image_tokens", max_image_tokens, minimum=num_prefix_tokens + 1, owner=owner
    )
    unsupported = {
        "num_register_tokens": num_register_tokens,
        "patch_merger": patch_merger,
        "ensemble_size > 1": ensemble_size > 1,
    }
    for name, value in unsupported.items():
        if value:
            raise ValueError(f"{owner}: native_resolution=True does not support {name} (got {value!r}).")
    return max_images, max_image_tokens


def packed_inputs(patch_size, channels):
    """The three inputs of a packed batch (see `keras_vmoe.layers.packing`)."""
    return {
        "patches": keras.Input((None, patch_size[0] * patch_size[1] * channels), name="patches"),
        "positions": keras.Input((None, 2), dtype="int32", name="positions"),
        "segment_ids": keras.Input((None,), dtype="int32", name="segment_ids"),
    }


def packed_embedding(
    inputs,
    hidden_dim,
    patch_size,
    grid_size,
    position_embedding,
    use_class_token,
    max_images,
    max_image_tokens,
    dtype,
):
    """(tokens (B, L, D), layout): the embedded packed sequence, named as the
    square-image layers (`patch_embedding`, `class_token`,
    `position_embedding`), and the `PackedLayout` the blocks and pooling use."""
    return embed_packed(
        inputs,
        PackedLayout(max_images, max_image_tokens, dtype=dtype, name="packed_layout"),
        PatchEmbedding(hidden_dim, patch_size, dtype=dtype, name="patch_embedding"),
        FactorizedPositionEmbedding(
            position_embedding, grid_size, max_images, dtype=dtype, name="position_embedding"
        ),
        ClassToken(dtype=dtype, name="class_token") if use_class_token else None,
    )


def embed_packed(inputs, layout_layer, patch_embedding, position_embedding, class_token=None):
    """Runs the packed embedding layers on `inputs` (`packed_inputs`):
    (tokens (B, L, D), layout), the class token (if any) in each image's
    reserved slot."""
    layout = layout_layer(inputs["positions"], inputs["segment_ids"])
    x = patch_embedding(inputs["patches"])
    if class_token is not None:
        x = class_token(x, prefix_mask=layout["prefix_mask"])
    x = position_embedding(x, inputs["positions"], inputs["segment_ids"])
    return x, layout


def build_packed_moe(block, index, packed_routing, max_image_tokens, hidden_dim, owner):
    """Builds a block's MoE layer for packed input: one group of
    `max_image_tokens` per image (`packed_routing="image"`), or one group
    per sequence (token-choice layers only)."""
    mlp = block.mlp
    if not hasattr(mlp, "group_tokens"):
        return
    if mlp.group_size is not None:
        raise ValueError(
            f"{owner}: with native_resolution=True the MoE layer of block {index} routes one group "
            f"per image (or per sequence, packed_routing='sequence'); give it group_size=None, "
            f"not {mlp.group_size}."
        )
    if packed_routing == "image":
        mlp.build((None, max_image_tokens, hidden_dim))
    elif getattr(mlp, "router", None) is None or not mlp.router.drops_tokens:
        raise ValueError(
            f"{owner}: packed_routing='sequence' is for token-choice MoE layers; block {index} has "
            f"{type(mlp).__name__}, whose slots would mix the images of a sequence. Use "
            "packed_routing='image'."
        )
