"""Converts a keras-hub `DINOV2Backbone` into our encoder.

keras-hub's DINOv2 is a ViT with a class token, a learned position table over
the class token and the patches, register tokens inserted after the position
embedding (`dinov2_with_registers_*`: they get no position), pre-LayerNorm
blocks (epsilon 1e-6) with LayerScale on both branches and an exact-GELU MLP,
and a final LayerNorm; the backbone returns every token. That is our
`VMoEBackbone(use_class_token=True, num_register_tokens=R,
layer_scale_init=..., approximate_gelu=False)`, weight for weight.

The position table keras-hub uses is resized from its source grid (trained at
518x518) to the backbone's `image_shape` by `keras.ops.image.resize`
(bicubic, antialiased for the with-registers presets), whose kernel differs
between backends (Keys a = -0.5 on JAX and TensorFlow, PyTorch's a = -0.75 on
torch). The converter copies the resized table keras-hub holds, or, for
another `image_shape`, resizes with keras-hub's own function: the result is
what keras-hub computes on the running backend.

Not converted: the giant presets' SwiGLU MLP (`use_swiglu_ffn=True`; our MLP
and experts are two-matrix GELU MLPs), and the mask token, which only
masked-image pre-training uses.
"""

import keras_hub

from keras_vmoe.convert.keras_hub_source import load_keras_hub_backbone
from keras_vmoe.convert.weight_pairs import assign_pairs
from keras_vmoe.convert.weight_pairs import attention_pairs
from keras_vmoe.convert.weight_pairs import check_pairs
from keras_vmoe.convert.weight_pairs import dense_pairs
from keras_vmoe.convert.weight_pairs import layer_norm_pairs
from keras_vmoe.keras_hub_internals import DINOV2Embedding
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models.encoder_stack import check_image_and_patch_size

_CONVERTER = "from_keras_hub_dinov2"
_LAYER_NORM_EPSILON = 1e-6  # Fixed in keras-hub's DINOv2 layers.


def _dinov2_pairs(dino, backbone, position_table):
    """[(description, keras-hub variable or array, our variable)]."""
    embeddings = dino.embeddings
    pairs = dense_pairs(
        "patch embedding", embeddings.patch_embeddings.projection, backbone.get_layer("patch_embedding").conv
    )
    pairs.append(("class token", embeddings.cls_token, backbone.get_layer("class_token").token))
    pairs.append(("position embedding", position_table, backbone.get_layer("position_embedding").embedding))
    if dino.num_register_tokens:
        pairs.append(
            ("register tokens", embeddings.register_tokens, backbone.get_layer("register_tokens").tokens)
        )
    for index, (theirs, ours) in enumerate(zip(dino.encoder.layers, backbone.encoder_blocks)):
        block = f"block {index}"
        pairs += layer_norm_pairs(f"{block} attention LayerNorm", theirs.norm1, ours.attention_norm)
        pairs += attention_pairs(f"{block} attention", theirs.attention.attention, ours.attention)
        pairs.append((f"{block} attention LayerScale", theirs.layer_scale1.lambda1, ours.attention_scale))
        pairs += layer_norm_pairs(f"{block} MLP LayerNorm", theirs.norm2, ours.mlp_norm)
        pairs += dense_pairs(f"{block} MLP 0", theirs.mlp.fc1, ours.mlp.dense_0)
        pairs += dense_pairs(f"{block} MLP 1", theirs.mlp.fc2, ours.mlp.dense_1)
        pairs.append((f"{block} MLP LayerScale", theirs.layer_scale2.lambda1, ours.mlp_scale))
    pairs += layer_norm_pairs("final LayerNorm", dino.layernorm, backbone.get_layer("encoder_norm"))
    return pairs


def from_keras_hub_dinov2(source, image_shape=None, pooling=None, dtype=None):
    """Builds a dense `VMoEBackbone` computing what a keras-hub DINOv2 computes.

    Args:
        source: a `keras_hub.models.DINOV2Backbone` (or a task on one), or a
            preset of one: a local folder written by `save_to_preset`, or a
            name or handle keras-hub resolves (`"dinov2_small"`,
            `"dinov2_with_registers_base"`, `"kaggle://..."`).
        image_shape: (height, width, 3) of the new backbone (square, as
            keras-hub's). Default: the source's. Another size resizes the
            position table as keras-hub's `from_preset(..., image_shape=)`
            does.
        pooling: None (default): every token, `[class, registers..., patches]`
            after the final LayerNorm, as keras-hub's backbone returns;
            `"token"`: the class token (Hugging Face's pooler); `"gap"`: the
            mean of the patch tokens (registers excluded).
        dtype: dtype policy of the new backbone (default: the source's).

    Returns:
        A dense `VMoEBackbone`, ready for `keras_vmoe.upcycle`.

    Example:
    >>> dino = keras_hub.models.DINOV2Backbone(
    ...     patch_size=8, num_layers=2, hidden_dim=32, num_heads=2,
    ...     intermediate_dim=64, num_register_tokens=2,
    ...     image_shape=(32, 32, 3), position_embedding_shape=(48, 48, 3))
    >>> backbone = from_keras_hub_dinov2(dino)
    >>> tuple(backbone(np.zeros((1, 32, 32, 3))).shape)  # [class, 2 registers, 16 patches]
    (1, 19, 32)
    """
    if pooling not in ("token", "gap", None):
        raise ValueError(f"{_CONVERTER}: pooling must be 'token', 'gap' or None, got {pooling!r}.")
    kwargs = {} if dtype is None else {"dtype": dtype}
    if image_shape is not None and isinstance(source, str):
        kwargs["image_shape"] = tuple(image_shape)
    dino = load_keras_hub_backbone(source, (keras_hub.models.DINOV2Backbone,), _CONVERTER, **kwargs)
    if dino.use_swiglu_ffn:
        raise ValueError(
            f"{_CONVERTER}: this DINOv2 uses a SwiGLU MLP (use_swiglu_ffn=True, the giant presets); "
            "only the GELU-MLP DINOv2s (small, base, large) convert."
        )
    embeddings = dino.embeddings
    if embeddings.data_format != "channels_last":
        raise ValueError(f"{_CONVERTER}: only channels_last DINOv2 backbones convert.")
    source_shape = tuple(int(side) for side in dino.image_shape)
    if image_shape is None:
        image_shape = source_shape
    image_shape, _ = check_image_and_patch_size(image_shape, dino.patch_size, _CONVERTER)
    if image_shape[0] != image_shape[1]:
        raise ValueError(f"{_CONVERTER}: image_shape must be square as keras-hub's, got {image_shape}.")
    if image_shape[:2] == source_shape[:2]:
        position_table = embeddings.interpolated_position_embeddings
    else:
        position_table = DINOV2Embedding._interpolate_position_embeddings(
            embeddings.position_embeddings,
            patch_size=dino.patch_size,
            source_shape=embeddings.position_embedding_shape,
            target_shape=image_shape[:2],
            antialias=embeddings.antialias_in_interpolation,
        )
    backbone = VMoEBackbone(
        image_shape=image_shape,
        patch_size=dino.patch_size,
        num_layers=dino.num_layers,
        hidden_dim=dino.hidden_dim,
        mlp_dim=dino.intermediate_dim,
        num_heads=dino.num_heads,
        pooling=pooling,
        use_class_token=True,
        position_embedding="learned",
        dropout_rate=dino.dropout_rate,
        attention_dropout_rate=dino.dropout_rate,
        approximate_gelu=False,
        layer_norm_epsilon=_LAYER_NORM_EPSILON,
        layer_scale_init=dino.layer_scale_init_value,
        num_register_tokens=dino.num_register_tokens,
        dtype=dtype or dino.dtype_policy,
    )
    pairs = _dinov2_pairs(dino, backbone, position_table)
    # The source grid only feeds the resizing above (the table used may be a
    # resized copy); the mask token only serves masked-image pre-training.
    skip = [embeddings.position_embeddings, embeddings.interpolated_position_embeddings]
    if dino.embeddings.use_mask_token:
        skip.append(embeddings.mask_token)
    check_pairs(_CONVERTER, pairs, dino, backbone, skip=skip)
    assign_pairs(_CONVERTER, pairs)
    return backbone
