"""Converts a keras-hub PaliGemma (a `PaliGemmaCausalLM`, its backbone, or a
preset of one) into a `PaliGemmaMoECausalLM` with a dense image tower.

keras-hub's `PaliGemmaVit` is a SigLIP ViT: no class token, a learned
position embedding, pre-LayerNorm blocks (epsilon 1e-6) with tanh-GELU MLPs,
a final LayerNorm, then a Dense projection to the decoder width
(`image_classifier`). That is our encoder with `use_class_token=False`,
`pooling=None`, `approximate_gelu=True`, followed by the backbone's
`image_projection`. Its attention kernels are (D, D) matrices; ours are
flax-style (D, heads, head_dim) and (heads, head_dim, D), the same numbers
reshaped. The decoder (token embedding, `PaliGemmaDecoderBlock`s, final
RMSNorm) is keras-hub's own, so its weights copy one to one.

The converted model can then be upcycled: `keras_vmoe.upcycle(causal_lm,
num_experts=..., moe_layers=...)` turns MLPs of the image tower into MoE
layers of copied experts.
"""

import os

import keras_hub

from keras_vmoe.convert.weight_pairs import assign_pairs
from keras_vmoe.convert.weight_pairs import check_pairs
from keras_vmoe.errors import CheckpointError
from keras_vmoe.models import PaliGemmaMoEBackbone
from keras_vmoe.models import PaliGemmaMoECausalLM
from keras_vmoe.models import PaliGemmaMoECausalLMPreprocessor
from keras_vmoe.models import PaliGemmaMoEImageConverter
from keras_vmoe.models import PaliGemmaMoETokenizer
from keras_vmoe.models import VMoEBackbone


def _vit_pairs(vit, tower, projection):
    """[(name, keras-hub variable, our variable)] for the image tower."""
    encoder = vit.get_layer("image_encoder")
    embeddings = encoder.vision_embeddings
    pairs = [
        (
            "patch embedding kernel",
            embeddings.patch_embedding.kernel,
            tower.get_layer("patch_embedding").conv.kernel,
        ),
        (
            "patch embedding bias",
            embeddings.patch_embedding.bias,
            tower.get_layer("patch_embedding").conv.bias,
        ),
        # (N, D) -> (1, N, D).
        (
            "position embedding",
            embeddings.position_embedding.embeddings,
            tower.get_layer("position_embedding").embedding,
        ),
        ("final LayerNorm scale", encoder.encoder_layer_norm.gamma, tower.get_layer("encoder_norm").gamma),
        ("final LayerNorm bias", encoder.encoder_layer_norm.beta, tower.get_layer("encoder_norm").beta),
        ("image projection kernel", vit.get_layer("image_classifier").kernel, projection.kernel),
        ("image projection bias", vit.get_layer("image_classifier").bias, projection.bias),
    ]
    for index, (theirs, ours) in enumerate(zip(encoder.resblocks, tower.encoder_blocks)):
        block = f"ViT block {index}"
        pairs += [
            (f"{block} attention LayerNorm scale", theirs.layer_norm_1.gamma, ours.attention_norm.gamma),
            (f"{block} attention LayerNorm bias", theirs.layer_norm_1.beta, ours.attention_norm.beta),
            (f"{block} MLP LayerNorm scale", theirs.layer_norm_2.gamma, ours.mlp_norm.gamma),
            (f"{block} MLP LayerNorm bias", theirs.layer_norm_2.beta, ours.mlp_norm.beta),
            (f"{block} MLP kernel 0", theirs.mlp_dense_1.kernel, ours.mlp.dense_0.kernel),
            (f"{block} MLP bias 0", theirs.mlp_dense_1.bias, ours.mlp.dense_0.bias),
            (f"{block} MLP kernel 1", theirs.mlp_dense_2.kernel, ours.mlp.dense_1.kernel),
            (f"{block} MLP bias 1", theirs.mlp_dense_2.bias, ours.mlp.dense_1.bias),
        ]
        # (D, D) -> (D, heads, head_dim); the output kernel (D, D) ->
        # (heads, head_dim, D): keras-hub splits heads as head * head_dim + k.
        for name, their_dense, our_dense in (
            ("query", theirs.attn.query_proj, ours.attention.query),
            ("key", theirs.attn.key_proj, ours.attention.key),
            ("value", theirs.attn.value_proj, ours.attention.value),
            ("output", theirs.attn.out_proj, ours.attention.out),
        ):
            pairs.append((f"{block} attention {name} kernel", their_dense.kernel, our_dense.kernel))
            pairs.append((f"{block} attention {name} bias", their_dense.bias, our_dense.bias))
    return pairs


def _decoder_pairs(theirs, ours):
    """[(name, keras-hub variable, our variable)] for the (shared) decoder."""
    pairs = [
        ("token embedding", theirs.token_embedding.embeddings, ours.token_embedding.embeddings),
        ("final RMSNorm scale", theirs.layer_norm.scale, ours.layer_norm.scale),
    ]
    for their_block, our_block in zip(theirs.transformer_layers, ours.transformer_layers):
        # The same layer class with the same arguments: the same variables,
        # with the same paths, in the same order.
        their_paths = [variable.path for variable in their_block.weights]
        our_paths = [variable.path for variable in our_block.weights]
        if their_paths != our_paths:
            raise CheckpointError(
                f"from_keras_hub_pali_gemma: decoder block {their_block.name} holds "
                f"{their_paths} in the keras-hub model but {our_paths} in the converted one."
            )
        for their_variable, our_variable in zip(their_block.weights, our_block.weights):
            pairs.append((their_variable.path, their_variable, our_variable))
    return pairs


def _backbone_from_keras_hub(pali_gemma, dtype):

    # (keras-hub cannot build a PaliGemma whose ViT pools: the decoder needs
    # every image token.)
    vit = pali_gemma.vit_encoder
    if pali_gemma.vit_classifier_activation is not None:
        raise ValueError(
            "from_keras_hub_pali_gemma: only a linear image projection can be converted, "
            f"got vit_classifier_activation={pali_gemma.vit_classifier_activation!r}."
        )
    dtype = dtype or pali_gemma.dtype_policy
    tower = VMoEBackbone(
        image_shape=(pali_gemma.image_size, pali_gemma.image_size, 3),
        patch_size=pali_gemma.vit_patch_size,
        num_layers=pali_gemma.vit_num_layers,
        hidden_dim=pali_gemma.vit_hidden_dim,
        mlp_dim=pali_gemma.vit_intermediate_dim,
        num_heads=pali_gemma.vit_num_heads,
        pooling=None,
        use_class_token=False,
        position_embedding="learned",
        approximate_gelu=True,
        layer_norm_epsilon=1e-6,  # Fixed in keras-hub's PaliGemmaVit.
        dtype=dtype,
        name="image_encoder",
    )
    backbone = PaliGemmaMoEBackbone(
        vocabulary_size=pali_gemma.vocabulary_size,
        image_encoder=tower,
        num_layers=pali_gemma.num_layers,
        num_query_heads=pali_gemma.num_query_heads,
        num_key_value_heads=pali_gemma.num_key_value_heads,
        hidden_dim=pali_gemma.hidden_dim,
        intermediate_dim=pali_gemma.intermediate_dim,
        head_dim=pali_gemma.head_dim,
        query_head_dim_normalize=pali_gemma.query_head_dim_normalize,
        use_post_ffw_norm=pali_gemma.use_post_ffw_norm,
        use_post_attention_norm=pali_gemma.use_post_attention_norm,
        attention_logit_soft_cap=pali_gemma.attention_logit_soft_cap,
        final_logit_soft_cap=pali_gemma.final_logit_soft_cap,
        use_sliding_window_attention=pali_gemma.use_sliding_window_attention,
        sliding_window_size=pali_gemma.sliding_window_size,
        layer_norm_epsilon=pali_gemma.layer_norm_epsilon,
        dropout=pali_gemma.dropout,
        dtype=dtype,
    )
    pairs = _vit_pairs(vit, tower, backbone.image_projection) + _decoder_pairs(pali_gemma, backbone)
    check_pairs("from_keras_hub_pali_gemma", pairs, pali_gemma, backbone)
    assign_pairs("from_keras_hub_pali_gemma", pairs)
    return backbone


def _preprocessor_from_keras_hub(preprocessor):

    image_converter = None
    if preprocessor.image_converter is not None:
        config = preprocessor.image_converter.get_config()
        config.pop("name", None)
        image_converter = PaliGemmaMoEImageConverter.from_config(config)
    return PaliGemmaMoECausalLMPreprocessor(
        PaliGemmaMoETokenizer(proto=preprocessor.tokenizer.proto),
        image_converter,
        sequence_length=preprocessor.sequence_length,
        add_start_token=preprocessor.add_start_token,
        add_end_token=preprocessor.add_end_token,
    )


def from_keras_hub_pali_gemma(source, dtype=None):
    """Builds our PaliGemma, with a dense image tower, from a keras-hub one.

    Args:
        source: a `keras_hub.models.PaliGemmaCausalLM` or `PaliGemmaBackbone`,
            or a preset that `keras_hub.models.PaliGemmaCausalLM.from_preset`
            loads: a local preset folder (e.g. written by `save_to_preset`),
            a `kaggle://` / `hf://` handle, or a keras-hub preset name such
            as `"pali_gemma_3b_mix_224"` (downloaded by keras-hub). A preset
            is loaded into keras-hub's model first, so converting one needs
            memory for two copies of the weights.
        dtype: dtype policy of the new model (default: the source's).

    Returns:
        A `PaliGemmaMoECausalLM` (with the converted tokenizer, image
        converter and sequence length) for a causal LM or a preset; a
        `PaliGemmaMoEBackbone` for a backbone. It computes the same logits
        as the source.

    Example:
    ```python
    causal_lm = keras_vmoe.convert.from_keras_hub_pali_gemma("path/to/preset")
    causal_lm.generate({"images": image, "prompts": "caption en\\n"})
    moe = keras_vmoe.upcycle(causal_lm, num_experts=8, moe_layers=(25, 26),
                             router="soft")  # MoE in the image tower.
    ```
    """

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        kwargs = {} if dtype is None else {"dtype": dtype}
        source = keras_hub.models.PaliGemmaCausalLM.from_preset(source, **kwargs)
    if isinstance(source, keras_hub.models.PaliGemmaBackbone):
        return _backbone_from_keras_hub(source, dtype)
    if not isinstance(source, keras_hub.models.PaliGemmaCausalLM) or not isinstance(
        source.backbone, keras_hub.models.PaliGemmaBackbone
    ):
        raise ValueError(
            "from_keras_hub_pali_gemma expects a keras-hub PaliGemmaCausalLM, a "
            f"PaliGemmaBackbone or a preset of one, got {type(source).__name__}."
        )
    backbone = _backbone_from_keras_hub(source.backbone, dtype)
    preprocessor = None
    if source.preprocessor is not None:
        preprocessor = _preprocessor_from_keras_hub(source.preprocessor)
    return PaliGemmaMoECausalLM(backbone, preprocessor)
