"""Which expert each token goes to: routing decisions of a backbone's MoE layers.

`expert_assignments(backbone, images)` answers, for every MoE block, which
expert processes each token of each image (eval mode, as `predict` routes):

- a sparse (V-MoE) block: the expert of the token's first kept choice, in
  the router's priority order (top-1 before top-2; with expert-choice
  routing, the lowest-numbered expert that took it), or -1 when every
  choice was dropped (the token skips the MLP through the residual);
- a Soft MoE block: the expert whose slots take the largest share of the
  token's output (its combine weights summed per expert), since every
  token is a mix of all slots.

`selected_experts` gives every expert that processes each token (up to K
for a sparse block), for comparing routings (`keras_vmoe.evaluation`).

Example:
```python
assignments = keras_vmoe.models.expert_assignments(classifier.backbone, pixels)
assignments[3].shape  # (images, tokens) of block 3; values in [-1, num_experts).
```
"""

import keras
import numpy as np
from keras import ops

from keras_vmoe.layers.routing_plans import SoftRoutingPlan


def router_inputs(backbone, images):
    """{block index: (G, S, D) tokens} that each MoE block's router sees.

    `images` are model inputs (already preprocessed pixels). One forward
    pass up to the last MoE block; each block's attention is rerun on its
    input to get the normalised tokens its MLP receives.
    """
    if getattr(backbone, "native_resolution", False):
        raise ValueError(
            "Routing inspection reads square-image backbones; this one has native_resolution=True "
            "(packed sequences), which it does not support yet."
        )
    blocks = [backbone.get_layer(f"encoder_block_{index}") for index in backbone.moe_layers]
    if not blocks:
        return {}
    block_inputs = keras.Model(backbone.input, [block.input for block in blocks])(images)
    if len(blocks) == 1:  # A functional model returns a lone output unwrapped.
        block_inputs = [block_inputs]
    return {
        index: block.router_tokens(block.attend(x))
        for index, block, x in zip(backbone.moe_layers, blocks, block_inputs)
    }


def plan_experts(plan, capacity):
    """(G, S, K) int: the expert of each of a token's choices in a sparse
    `RoutingPlan`, -1 where dropped; kept choices first (top-1 before top-2,
    the rest in expert order for expert choice), so [..., 0] is the first
    kept choice, or -1 when the token has none."""
    slots = np.asarray(keras.ops.convert_to_numpy(plan.combine_index))  # (G, S, K)
    num_slots = np.asarray(keras.ops.convert_to_numpy(plan.dispatch_index)).shape[1] * capacity
    kept = slots < num_slots
    experts = np.where(kept, slots // capacity, -1)
    order = np.argsort(~kept, axis=-1, kind="stable")  # Kept choices first, in order.
    return np.take_along_axis(experts, order, axis=-1)


def _block_plans(backbone, images):
    """(block index, MoE layer, routing plan, capacity or None) per MoE block,
    as the router decides in eval mode."""
    for index, tokens in router_inputs(backbone, images).items():
        moe = backbone.get_layer(f"encoder_block_{index}").mlp
        plan, _ = moe.route(tokens, training=False)
        capacity = None if isinstance(plan, SoftRoutingPlan) else moe.router.capacity(tokens.shape[1])
        yield index, moe, plan, capacity


def _soft_expert(plan):
    """(G, S) the expert whose slots take the largest share of each token's
    output in a Soft MoE plan (its (G, S, E, P) combine weights summed per expert)."""
    share = keras.ops.convert_to_numpy(ops.sum(plan.combine_weights, axis=-1))
    return np.argmax(share, axis=-1)


def expert_assignments(backbone, images):
    """{block index: int array (images, tokens)} of the expert each token goes to.

    Tokens are those the block sees: with a class token it comes first; after
    a PatchMerger they are the merged tokens. -1 marks a token a sparse
    block dropped. For an E^3 backbone the rows are the ensemble members,
    (images * M, tokens), row b * M + m = member m of image b.
    """
    batch = int(ops.shape(images)[0])
    assignments = {}
    for index, moe, plan, capacity in _block_plans(backbone, images):
        if capacity is None:
            expert = _soft_expert(plan)
        else:
            expert = plan_experts(plan, capacity)[..., 0]
        assignments[index] = _per_row(moe, expert, batch).astype("int32")
    return assignments


def selected_experts(backbone, images):
    """{block index: bool array (images, tokens, experts)}: the experts that
    process each token, as vmoe's adversarial study reads them from the
    combine weights (an expert is selected when its weight is > 0).

    - a sparse block: every kept choice of the token (up to K experts; none
      when all its choices were dropped);
    - a Soft MoE block, where every token mixes all experts: the one expert
      of `expert_assignments` (the largest share of the token's output).

    Example:
    ```python
    chosen = keras_vmoe.models.selected_experts(classifier.backbone, pixels)
    chosen[3].sum(-1)  # (images, tokens): experts per token, 0 to K.
    ```
    """
    batch = int(ops.shape(images)[0])
    selected = {}
    for index, moe, plan, capacity in _block_plans(backbone, images):
        if capacity is None:
            chosen = _soft_expert(plan)[..., None]  # (G, S, 1)
        else:
            chosen = plan_experts(plan, capacity)  # (G, S, K), -1 where dropped
        num_experts = moe.num_experts
        one_hot = (chosen[..., None] == np.arange(num_experts)).any(axis=-2)  # (G, S, E)
        selected[index] = _per_row(moe, one_hot, batch)
    return selected


def _per_row(moe, values, batch):
    """(G, S, ...) per-token values -> (rows, tokens, ...), one row per image,
    or per ensemble member (row b * M + m) for an E^3 layer."""
    rows = batch * moe.ensemble_size
    tokens = values.shape[0] * values.shape[1] // rows
    return np.asarray(ops.convert_to_numpy(moe.from_groups(values, tokens)))
