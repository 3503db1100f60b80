"""Converts the vision tower of a keras-hub SigLIP or SigLIP 2 model into our
encoder, with its attention-pooling (MAP) head.

keras-hub's `SigLIPVisionEncoder` (SigLIP 2 presets use the same classes) is
a ViT without a class token: a Conv2D patch embedding with bias, a learned
position table, pre-LayerNorm blocks whose attention is a
`keras.layers.MultiHeadAttention` with biases, a tanh-GELU MLP
(`"gelu_approximate"`; `"gelu"` is the exact one), a final LayerNorm with
epsilon fixed at 1e-6, then `SigLIPMultiHeadAttentionPooling`: a learned
probe attends to the tokens, then `h + mlp(layer_norm(h))`. That is our
`VMoEBackbone(use_class_token=False, pooling="map")`, weight for weight: the
attention kernels have the same (D, heads, head_dim) layout.

The text tower of a `SigLIPBackbone` is not converted: our image models do
not use it, and LIMoE's text side is a different design (one stack shared by
both modalities), so SigLIP's separate text tower has no place to go.
"""

import keras_hub

from keras_vmoe.convert.keras_hub_source import load_keras_hub_backbone
from keras_vmoe.convert.weight_pairs import assign_pairs
from keras_vmoe.convert.weight_pairs import attention_pairs
from keras_vmoe.convert.weight_pairs import check_pairs
from keras_vmoe.convert.weight_pairs import dense_pairs
from keras_vmoe.convert.weight_pairs import layer_norm_pairs
from keras_vmoe.models import VMoEBackbone

_CONVERTER = "from_keras_hub_siglip"
_ACTIVATIONS = {"gelu_approximate": True, "gelu": False}
_FINAL_NORM_EPSILON = 1e-6  # Fixed in keras-hub's SigLIPVisionEncoder.


def _siglip_pairs(vision, backbone):
    """[(description, keras-hub variable, our variable)] of the vision tower."""
    embedding = vision.embedding
    pairs = dense_pairs(
        "patch embedding", embedding.patch_embedding, backbone.get_layer("patch_embedding").conv
    )
    # (N, D) -> (1, N, D).
    pairs.append(
        (
            "position embedding",
            embedding.position_embedding.embeddings,
            backbone.get_layer("position_embedding").embedding,
        )
    )
    for index, (theirs, ours) in enumerate(zip(vision.encoder_layers, backbone.encoder_blocks)):
        block = f"block {index}"
        pairs += layer_norm_pairs(f"{block} attention LayerNorm", theirs.layer_norm1, ours.attention_norm)
        pairs += attention_pairs(f"{block} attention", theirs.self_attn, ours.attention)
        pairs += layer_norm_pairs(f"{block} MLP LayerNorm", theirs.layer_norm2, ours.mlp_norm)
        pairs += dense_pairs(f"{block} MLP 0", theirs.mlp.fc1, ours.mlp.dense_0)
        pairs += dense_pairs(f"{block} MLP 1", theirs.mlp.fc2, ours.mlp.dense_1)
    pairs += layer_norm_pairs("final LayerNorm", vision.post_layer_norm, backbone.get_layer("encoder_norm"))
    if backbone.pooling == "map":
        head, ours = vision.head, backbone.get_layer("map_pooling")
        pairs.append(("MAP probe", head.probe, ours.probe))
        pairs += attention_pairs("MAP attention", head.attention, ours.attention)
        pairs += layer_norm_pairs("MAP LayerNorm", head.layer_norm, ours.norm)
        pairs += dense_pairs("MAP MLP 0", head.mlp.fc1, ours.mlp.dense_0)
        pairs += dense_pairs("MAP MLP 1", head.mlp.fc2, ours.mlp.dense_1)
    return pairs


def from_keras_hub_siglip(source, pooling="map", dtype=None):
    """Builds a dense `VMoEBackbone` computing what a keras-hub SigLIP vision
    tower computes.

    Args:
        source: a `keras_hub.models.SigLIPBackbone` (its vision tower is
            converted) or `SigLIPVisionEncoder`, or a preset of either: a local
            folder written by `save_to_preset`, or a name or handle keras-hub
            resolves (`"siglip2_base_patch16_224"`, `"kaggle://..."`). A
            folder holding another family's preset is refused before its
            weights are read.
        pooling: `"map"` (default): SigLIP's attention-pooling head, one
            `hidden_dim` vector per image, as `SigLIPVisionEncoder` returns;
            None: every token after the final LayerNorm (the head is dropped).
        dtype: dtype policy of the new backbone (default: the source's).

    Returns:
        A dense `VMoEBackbone` (`use_class_token=False`), ready for
        `keras_vmoe.upcycle`. A `SigLIPBackbone`'s text tower is left out.
        Preprocessing is not part of either backbone: SigLIP presets take
        pixels scaled to [-1, 1] by their image converter.

    Example:
    >>> vision = keras_hub.models.SigLIPVisionEncoder(
    ...     patch_size=8, hidden_dim=32, num_layers=2, num_heads=2,
    ...     intermediate_dim=64, image_shape=(32, 32, 3))
    >>> backbone = from_keras_hub_siglip(vision)
    >>> tuple(backbone(np.zeros((1, 32, 32, 3))).shape)  # As vision(...) gives.
    (1, 32)
    """
    source = load_keras_hub_backbone(
        source,
        (keras_hub.models.SigLIPBackbone, keras_hub.models.SigLIPVisionEncoder),
        _CONVERTER,
        **({} if dtype is None else {"dtype": dtype}),
    )
    if isinstance(source, keras_hub.models.SigLIPBackbone):
        source = source.vision_encoder
    vision = source
    if pooling not in ("map", None):
        raise ValueError(f"{_CONVERTER}: pooling must be 'map' or None, got {pooling!r}.")
    if vision.intermediate_activation not in _ACTIVATIONS:
        raise ValueError(
            f"{_CONVERTER}: the MLP activation must be one of {sorted(_ACTIVATIONS)}, "
            f"got {vision.intermediate_activation!r}."
        )
    if vision.layer_norm_epsilon != _FINAL_NORM_EPSILON:
        raise ValueError(
            f"{_CONVERTER}: only layer_norm_epsilon={_FINAL_NORM_EPSILON} converts (keras-hub fixes the "
            f"final LayerNorm's epsilon at 1e-6, ours shares one epsilon), got {vision.layer_norm_epsilon}."
        )
    if vision.embedding.data_format != "channels_last":
        raise ValueError(f"{_CONVERTER}: only channels_last SigLIP towers convert.")
    backbone = VMoEBackbone(
        image_shape=tuple(vision.image_shape),
        patch_size=vision.patch_size,
        num_layers=vision.num_layers,
        hidden_dim=vision.hidden_dim,
        mlp_dim=vision.intermediate_dim,
        num_heads=vision.num_heads,
        pooling=pooling,
        use_class_token=False,
        position_embedding="learned",
        approximate_gelu=_ACTIVATIONS[vision.intermediate_activation],
        layer_norm_epsilon=vision.layer_norm_epsilon,
        dtype=dtype or vision.dtype_policy,
    )
    pairs = _siglip_pairs(vision, backbone)
    # position_ids are int indices 0..N-1, not weights; without pooling the
    # head has no counterpart.
    skip = [vision.embedding.position_ids]
    if pooling is None:
        skip += vision.head.weights
    check_pairs(_CONVERTER, pairs, vision, backbone, skip=skip)
    assign_pairs(_CONVERTER, pairs)
    return backbone
