"""Converts a keras-hub `ViTBackbone` (or a preset folder of one) into a
dense `VMoEBackbone` with the same function.

keras-hub's ViT uses exact GELU, a class token and a learned position
embedding over all positions; its backbone returns every token after the
final LayerNorm, so the result has `pooling=None` unless you ask otherwise.
"""

import os

import keras
import keras_hub

from keras_vmoe.errors import CheckpointError
from keras_vmoe.models import VMoEBackbone


def keras_hub_vit_name_table(backbone):
    """{keras-hub weight path suffix: our variable} for a dense VMoEBackbone."""
    table = {
        "vit_patching_and_embedding/patch_embedding/kernel": backbone.get_layer(
            "patch_embedding"
        ).conv.kernel,
        "vit_patching_and_embedding/patch_embedding/bias": backbone.get_layer("patch_embedding").conv.bias,
        "vit_patching_and_embedding/position_embedding/embeddings": backbone.get_layer(
            "position_embedding"
        ).embedding,
        "vit_encoder/ln/gamma": backbone.get_layer("encoder_norm").gamma,
        "vit_encoder/ln/beta": backbone.get_layer("encoder_norm").beta,
    }
    if backbone.use_class_token:
        table["vit_patching_and_embedding/class_token"] = backbone.get_layer("class_token").token
    for index, block in enumerate(backbone.encoder_blocks):
        prefix = f"vit_encoder/transformer_block_{index + 1}"
        attention = block.attention
        table.update(
            {
                f"{prefix}/ln_1/gamma": block.attention_norm.gamma,
                f"{prefix}/ln_1/beta": block.attention_norm.beta,
                f"{prefix}/ln_2/gamma": block.mlp_norm.gamma,
                f"{prefix}/ln_2/beta": block.mlp_norm.beta,
                f"{prefix}/mlp/dense_1/kernel": block.mlp.dense_0.kernel,
                f"{prefix}/mlp/dense_1/bias": block.mlp.dense_0.bias,
                f"{prefix}/mlp/dense_2/kernel": block.mlp.dense_1.kernel,
                f"{prefix}/mlp/dense_2/bias": block.mlp.dense_1.bias,
            }
        )
        for theirs, ours in (
            ("query", attention.query),
            ("key", attention.key),
            ("value", attention.value),
            ("attention_output", attention.out),
        ):
            table[f"{prefix}/mha/{theirs}/kernel"] = ours.kernel
            table[f"{prefix}/mha/{theirs}/bias"] = ours.bias
    return table


def from_keras_hub_vit(vit, pooling=None, dtype=None):
    """Builds a dense `VMoEBackbone` computing what keras-hub's ViT computes.

    Args:
        vit: a `keras_hub.models.ViTBackbone`, or a preset name or folder that
            `keras_hub.models.ViTBackbone.from_preset` can load.
        pooling: None (all tokens, like keras-hub's backbone), `"token"` or
            `"gap"`.
        dtype: dtype policy of the new backbone.

    Example:
    ```python
    vit = keras_hub.models.ViTBackbone.from_preset("vit_base_patch16_224_imagenet")
    backbone = keras_vmoe.convert.from_keras_hub_vit(vit, pooling="token")
    ```
    """

    if isinstance(vit, os.PathLike):
        vit = os.fspath(vit)
    if isinstance(vit, str):
        vit = keras_hub.models.ViTBackbone.from_preset(vit)
    if not isinstance(vit, keras_hub.models.ViTBackbone):
        raise ValueError(f"from_keras_hub_vit expects a keras_hub ViTBackbone, got {type(vit).__name__}.")
    if getattr(vit, "data_format", "channels_last") != "channels_last":
        raise ValueError("Only channels_last keras-hub ViTs can be converted.")
    if not (vit.use_mha_bias and vit.use_mlp_bias and vit.use_patch_bias):
        raise ValueError("Only keras-hub ViTs with biases everywhere can be converted.")
    backbone = VMoEBackbone(
        image_shape=tuple(vit.image_shape),
        patch_size=vit.patch_size,
        num_layers=vit.num_layers,
        hidden_dim=vit.hidden_dim,
        mlp_dim=vit.mlp_dim,
        num_heads=vit.num_heads,
        pooling=pooling,
        use_class_token=vit.use_class_token,
        position_embedding="learned",
        dropout_rate=vit.dropout_rate,
        attention_dropout_rate=vit.attention_dropout,
        approximate_gelu=False,
        layer_norm_epsilon=vit.layer_norm_epsilon,
        dtype=dtype,
    )
    theirs = {weight.path: weight for weight in vit.weights}
    table = keras_hub_vit_name_table(backbone)
    missing = [path for path in table if path not in theirs]
    if missing:
        raise CheckpointError(f"The keras-hub ViT lacks weights {missing}.")
    for path, variable in table.items():
        value = keras.ops.convert_to_numpy(theirs[path]).reshape(
            variable.shape
        )  # position table: (N, D) -> (1, N, D)
        variable.assign(value.astype(variable.dtype))
    return backbone
