"""Forward FLOPs of a Vision Transformer backbone, counted from its layers.

A multiply-add is 2 FLOPs; only matrix products are counted (they are all
but a few percent of a ViT's arithmetic): the patch embedding, attention
(projections, scores, weighted values), dense MLPs, MoE experts over the
slots they process, routers, Soft MoE dispatch/combine, PatchMerger and the
pooling head. Token counts are read from the built graph, so class tokens
and PatchMergers are accounted for, and a sparse MoE layer counts its
capacity-padded slots (what its experts compute), not the tokens it keeps.

Example:
```python
flops = keras_vmoe.models.count_flops(classifier)
flops["total"], flops["per_token"]  # per image; per patch token
```
"""

import math

from keras_vmoe.layers.mlp import Mlp
from keras_vmoe.layers.moe import SoftMoE
from keras_vmoe.layers.moe import SparseMoE


def _attention(queries, keys, dim):
    projections = 2 * queries * dim * dim * 2 + 2 * keys * dim * dim * 2  # q, out; k, v
    return projections + 2 * 2 * queries * keys * dim  # scores, weighted values


def _mlp(tokens, dim, mlp_dim):
    return 2 * 2 * tokens * dim * mlp_dim


def _moe_layer(layer, tokens, dim):
    """(expert FLOPs, routing FLOPs) per image of a MoE layer on `tokens` tokens."""
    group_size = layer.group_size or tokens
    groups_per_image = tokens / group_size
    experts = layer.num_experts
    if isinstance(layer, SparseMoE):
        slots = experts * layer.router.capacity(group_size)
        routing = 2 * group_size * dim * experts
    else:
        slots = experts * layer.num_slots(group_size)
        # Router logits, dispatch (slots from tokens) and combine.
        routing = 3 * 2 * group_size * slots * dim
    return (
        groups_per_image * _mlp(slots, dim, layer.mlp_dim),
        groups_per_image * routing,
    )


def count_flops(model):
    """Forward FLOPs per image of a `VisionTransformerBackbone` or of a task
    on one (a classifier's head included).

    An E^3 ensemble (`ensemble_size` M) counts its M members from the first
    MoE block on: the cost of one prediction.

    Returns:
        A dict of floats: `"patch_embedding"`, `"attention"`, `"mlp"` (dense
        MLPs and MoE experts), `"routing"` (routers, Soft MoE dispatch and
        combine, PatchMerger), `"head"` (pooling head, representation layer,
        classifier), `"total"`, and `"per_token"` (the total over the number
        of patches).
    """
    backbone = getattr(model, "backbone", model)
    height, width, channels = backbone.image_shape
    patch_height, patch_width = (
        backbone.patch_size
        if isinstance(backbone.patch_size, (tuple, list))
        else (backbone.patch_size, backbone.patch_size)
    )
    num_patches = (height // patch_height) * (width // patch_width)
    dim = backbone.hidden_dim
    counts = dict.fromkeys(("patch_embedding", "attention", "mlp", "routing", "head"), 0.0)
    counts["patch_embedding"] = 2 * num_patches * patch_height * patch_width * channels * dim
    # E^3: from the first MoE block on, every image runs as M members.
    members = getattr(backbone, "ensemble_size", 1)
    first_repeated = backbone.moe_layers[0] if members > 1 else backbone.num_layers
    for index, block in enumerate(backbone.encoder_blocks):
        tokens = block.input.shape[1]
        copies = members if index >= first_repeated else 1
        counts["attention"] += copies * _attention(tokens, tokens, dim)
        if isinstance(block.mlp, Mlp):
            counts["mlp"] += copies * _mlp(tokens, dim, block.mlp.mlp_dim)
        elif isinstance(block.mlp, (SparseMoE, SoftMoE)):
            # An image's M copies route together: `tokens * copies` per image.
            experts, routing = _moe_layer(block.mlp, tokens * copies, dim)
            counts["mlp"] += experts
            counts["routing"] += routing
        else:
            raise ValueError(f"count_flops: no count for the MLP layer {block.mlp!r}.")
    merger = backbone.patch_merger_layer
    if merger is not None:
        tokens_in = merger.input.shape[1] - merger.num_prefix_tokens
        # Merge weights (tokens x M) and the weighted sum (M x tokens x D).
        counts["routing"] += 2 * 2 * tokens_in * merger.num_tokens * dim
    final_tokens = backbone.encoder_blocks[-1].output.shape[1]
    if backbone.pooling == "map":
        pooling = backbone.get_layer("map_pooling")
        counts["head"] += _attention(1, final_tokens, dim) + _mlp(1, dim, pooling.mlp_dim)
    if backbone.representation_size:
        counts["head"] += 2 * dim * backbone.representation_size
    head = getattr(model, "head", None)
    if head is not None:
        counts["head"] += 2 * math.prod(head.kernel.shape)
    counts["head"] *= members
    counts["total"] = sum(counts.values())
    counts["per_token"] = counts["total"] / num_patches
    return counts
