"""Routing plans and the pure functions that build them from gates.

As vmoe separates its routers (gates, losses, metrics) from its dispatchers
(`vmoe/moe.py`), routers here compute scores and combine gates; the
functions below turn them into plans. A sparse plan is an index table, never
a one-hot (G, S, E, C) tensor (which costs O(S^2) memory):

- `RoutingPlan.dispatch_index` (G, E, C): the token each expert slot holds,
  S for an empty slot;
- `RoutingPlan.combine_index` (G, S, K): the flat slot `e * C + c` of each of
  a token's K choices, E * C for a dropped choice;
- `RoutingPlan.combine_weights` (G, S, K): the weight of each choice, 0 when
  dropped.

Soft MoE's plan is dense by nature: `SoftRoutingPlan.dispatch_weights` and
`combine_weights`, both (G, S, E, P).

Letters: G groups, S tokens per group, E experts, C slots per expert
(capacity), K choices per token, P slots per expert (Soft MoE).
"""

import collections
import math

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.ops import group_local
from keras_vmoe.ops.generic import PADDING_SCORE
from keras_vmoe.validation import check_choice

RoutingPlan = collections.namedtuple("RoutingPlan", ["dispatch_index", "combine_index", "combine_weights"])
SoftRoutingPlan = collections.namedtuple("SoftRoutingPlan", ["dispatch_weights", "combine_weights"])


def compute_capacity(num_tokens, num_experts, capacity_factor, rounding="ceil", multiple_of=4):
    """Slots per expert for `num_tokens` token choices (vmoe's `compute_capacity`).

    `ceil` (or `round`, Python's: half to even) of `num_tokens *
    capacity_factor / num_experts`, then rounded up to a multiple of
    `multiple_of` (None or 0: no rounding up).
    """
    check_choice("capacity_rounding", rounding, ("ceil", "round"))
    if rounding == "ceil":
        capacity = int(math.ceil(num_tokens * capacity_factor / num_experts))
    else:
        capacity = int(round(num_tokens * capacity_factor / num_experts))
    if capacity < 1:
        raise ValueError(
            f"num_tokens={num_tokens}, num_experts={num_experts} and "
            f"capacity_factor={capacity_factor} give a capacity of {capacity} "
            "slots per expert; it must be at least 1. Raise capacity_factor or "
            "group_size."
        )
    if multiple_of:
        capacity += (-capacity) % multiple_of
    return capacity


def token_mean(x, token_weights):
    """Mean over the tokens (axis 1) of (G, S, ...) x; with (G, S) 0/1
    `token_weights`, over the weighted (real) tokens only."""
    if token_weights is None:
        return ops.mean(x, axis=1)
    trailing = (1,) * (len(x.shape) - 2)
    weights = ops.reshape(token_weights, ops.shape(token_weights) + trailing)
    count = ops.maximum(ops.sum(token_weights, axis=1), 1.0)
    return ops.sum(x * weights, axis=1) / ops.reshape(count, ops.shape(count) + trailing)


def group_mean(x, group_weights=None):
    """The mean of a metric, (G,) per group (or a scalar); with (G,) 0/1
    `group_weights`, over the weighted groups only (packed images leave
    groups of padding only, which a mean over all groups would count)."""
    if group_weights is None or len(x.shape) != 1:
        return ops.mean(x)
    x = ops.cast(x, "float32")
    return ops.sum(x * group_weights) / ops.maximum(ops.sum(group_weights), 1.0)


def _distributed():
    # Under a keras.distribution the groups are sharded over devices: build
    # plans with ops a sharding compiler splits by group (`ops.group_local`).
    return keras.distribution.distribution() is not None


def scatter_table(destinations, values, num_groups, table_size):
    """Writes `values` at `destinations` of a (G, table_size) table, -1 elsewhere.

    destinations: (G, N) int in [0, table_size]; table_size itself is a
    scratch entry that takes whatever is written there and is cut off.
    values: (G, N) int >= 0; no two (group, destination < table_size) repeat.
    """
    if _distributed():
        return group_local.scatter_table(destinations, values, table_size)
    # An update, not `ops.scatter`: that one adds duplicates, and on torch it
    # is a Python loop over the updates.
    offsets = ops.arange(0, num_groups, dtype="int32")[:, None] * (table_size + 1)
    flat = ops.reshape(destinations + offsets, (-1, 1))
    table = ops.full((num_groups * (table_size + 1),), -1, dtype="int32")
    table = ops.scatter_update(table, flat, ops.reshape(ops.cast(values, "int32"), (-1,)))
    return ops.reshape(table, (num_groups, table_size + 1))[:, :table_size]


def top_k_experts_plan(
    scores,
    combine_gates,
    num_selected_experts,
    capacity,
    batch_priority=False,
    token_mask=None,
    renormalize=False,
):
    """Every token picks its top K experts by `scores` (vmoe's top-experts-per-item dispatcher).

    - every top-1 choice is served before any top-2 choice; within a rank,
      earlier tokens first, or with `batch_priority` (BPR) tokens with a
      larger top-1 score first (a stable sort); a choice whose expert already
      has `capacity` tokens is dropped;
    - the combine weight of a kept choice is its expert's `combine_gates`
      value (the softmax gates for most routers; vmoe does not renormalise
      them over the K choices unless `renormalize`, applied after BPR's
      ordering, which ranks by the raw top-1 score);
    - `token_mask` (G, S) bool: False marks padding, which takes no slot,
      has no kept choice and is served last.

    Args:
        scores: (G, S, E) float32, what tokens choose experts by (the gates,
            or a transport plan).
        combine_gates: (G, S, E) float32.
        num_selected_experts: K.
        capacity: C, slots per expert and group.

    Returns:
        (`RoutingPlan`, kept (G, S, K) bool: which choices got a slot).

    A backend may build the same tables faster (`keras_vmoe.ops.plan_builder`:
    eager PyTorch, in a tenth of the calls); `reference_top_k_experts_plan`
    is the `keras.ops` reference it is tested against.
    """
    args = (scores, combine_gates, num_selected_experts, capacity, batch_priority, token_mask, renormalize)
    build = moe_ops.plan_builder("top_k_experts_plan")
    if build is None:
        return reference_top_k_experts_plan(*args)
    *tables, kept = build(*args)
    return RoutingPlan(*tables), kept


def reference_top_k_experts_plan(
    scores,
    combine_gates,
    num_selected_experts,
    capacity,
    batch_priority=False,
    token_mask=None,
    renormalize=False,
):
    """`top_k_experts_plan` in `keras.ops` (the reference of every backend's
    `plan_builder("top_k_experts_plan")`)."""
    num_groups, group_size, num_experts = ops.shape(scores)
    k = num_selected_experts
    top_scores, top_experts = moe_ops.top_k(scores, k)  # (G, S, K)
    top_experts = ops.cast(top_experts, "int32")
    top_gates = ops.take_along_axis(combine_gates, top_experts, axis=-1)
    weights = None if token_mask is None else ops.cast(token_mask, scores.dtype)
    if batch_priority:
        # Serve tokens in decreasing order of their top-1 score; padding last.
        priority = top_scores[..., 0]
        if weights is not None:
            priority = ops.where(
                ops.cast(token_mask, "bool"), priority, ops.full_like(priority, PADDING_SCORE)
            )
        order = ops.cast(ops.argsort(-priority, axis=-1), "int32")
        experts_in_order = ops.take_along_axis(top_experts, ops.repeat(order[..., None], k, axis=-1), axis=1)
    else:
        experts_in_order = top_experts
    # (G, K * S): rank-major, so every top-1 choice precedes any top-2.
    priority_list = ops.reshape(ops.transpose(experts_in_order, (0, 2, 1)), (num_groups, -1))
    one_hot = moe_ops.one_hot(priority_list, num_experts, dtype="int32")  # (G, K*S, E)
    if weights is not None:  # Padding takes no slot.
        routed = ops.cast(token_mask, "int32")
        if batch_priority:
            routed = ops.take_along_axis(routed, order, axis=1)
        one_hot = one_hot * ops.tile(routed, (1, k))[..., None]
    # Position of each choice in its expert's buffer.
    position = ops.sum(ops.cumsum(one_hot, axis=1) * one_hot, axis=-1) - 1
    position = ops.transpose(ops.reshape(position, (num_groups, k, group_size)), (0, 2, 1))
    if batch_priority:
        inverse = ops.cast(ops.argsort(order, axis=-1), "int32")
        position = ops.take_along_axis(position, ops.repeat(inverse[..., None], k, axis=-1), axis=1)
    if renormalize:
        top_gates = top_gates / ops.sum(top_gates, axis=-1, keepdims=True)
    kept = position < capacity
    if weights is not None:
        kept = ops.logical_and(kept, ops.cast(token_mask, "bool")[..., None])
    dropped_slot = num_experts * capacity
    combine_index = ops.where(kept, top_experts * capacity + position, dropped_slot)
    combine_weights = ops.where(kept, top_gates, ops.zeros_like(top_gates))

    token_ids = ops.repeat(ops.arange(0, group_size, dtype="int32")[None, :, None], k, axis=2)
    token_ids = ops.broadcast_to(token_ids, ops.shape(combine_index))
    table = scatter_table(
        ops.reshape(combine_index, (num_groups, -1)),
        ops.reshape(token_ids, (num_groups, -1)),
        num_groups,
        dropped_slot,
    )
    dispatch_index = ops.where(table < 0, group_size, table)
    dispatch_index = ops.reshape(dispatch_index, (num_groups, num_experts, capacity))
    return RoutingPlan(dispatch_index, combine_index, combine_weights), kept


def top_c_tokens_plan(scores, combine_gates, capacity, token_mask=None):
    """Every expert takes its top C tokens by `scores` (vmoe's top-items-per-expert dispatcher).

    A token may be taken by 0 to E experts; its combine weight for each is
    its `combine_gates` value. `token_mask` (G, S) bool: padding (False) is
    never taken; an expert left with fewer real tokens than C keeps the
    rest of its slots empty.

    Args:
        scores: (G, S, E) float32; combine_gates: (G, S, E) float32;
        capacity: C <= S.

    Returns:
        (`RoutingPlan` with K = E, taken (G, S, E) bool, top_scores (G, E, C):
        the scores of each expert's slots, best first; padding's are
        `PADDING_SCORE`).
    """
    num_groups, group_size, num_experts = ops.shape(scores)
    if token_mask is not None:
        mask = ops.cast(token_mask, "bool")[..., None]
        scores = ops.where(mask, scores, ops.full_like(scores, PADDING_SCORE))
    # (G, E, C): the tokens each expert takes, best first.
    top_scores, dispatch_index = moe_ops.top_k(ops.transpose(scores, (0, 2, 1)), capacity)
    dispatch_index = ops.cast(dispatch_index, "int32")
    experts = ops.reshape(ops.arange(0, num_experts, dtype="int32"), (1, num_experts, 1))
    destinations = dispatch_index * num_experts + experts
    if token_mask is not None:
        # A padding token in a slot: the slot stays empty, the token untaken.
        real = ops.take_along_axis(ops.cast(token_mask, "bool")[:, None, :], dispatch_index, axis=2)
        dispatch_index = ops.where(real, dispatch_index, group_size)
        destinations = ops.where(real, destinations, group_size * num_experts)
    # Token-major view for the combine: (G, S, E) flat slot or E * C.
    slot_ids = ops.reshape(ops.arange(0, num_experts * capacity, dtype="int32"), (1, -1))
    slot_ids = ops.broadcast_to(slot_ids, (num_groups, num_experts * capacity))
    table = scatter_table(
        ops.reshape(destinations, (num_groups, -1)), slot_ids, num_groups, group_size * num_experts
    )
    table = ops.reshape(table, (num_groups, group_size, num_experts))
    taken = table >= 0
    combine_index = ops.where(taken, table, num_experts * capacity)
    combine_weights = ops.where(taken, combine_gates, ops.zeros_like(combine_gates))
    return RoutingPlan(dispatch_index, combine_index, combine_weights), taken, top_scores


def token_choice_metrics(kept, token_weights=None):
    """Dropped-token metrics of a top-K plan, per group: `dropped_choices`
    (fraction of the choices without a slot) and `dropped_tokens` (fraction of
    the tokens with none), over real tokens."""
    kept = ops.cast(kept, "float32")
    return {
        "dropped_choices": 1.0 - ops.mean(token_mean(kept, token_weights), axis=-1),
        "dropped_tokens": token_mean(ops.cast(moe_ops.amax(kept, axis=-1) == 0, "float32"), token_weights),
    }


def expert_choice_metrics(taken, top_scores, token_mask=None):
    """Per-group metrics of a top-C plan (vmoe's top-items dispatcher metrics):

    - `dropped_tokens`: fraction of the real tokens no expert took;
    - `experts_per_token_min` / `_max` (vmoe `num_experts_per_item_*`);
    - `min_selected_gate` / `max_selected_gate`: over the taken slots' scores;
    - `tokens_with_at_least_{t}_experts` for t = 1, 2, 4, ... < E and E (vmoe
      `ratio_processed_items_by_at_least_{t}_experts`; a fraction of S).
    """
    num_experts = taken.shape[-1]
    weights = None if token_mask is None else ops.cast(token_mask, "float32")
    experts_per_token = ops.sum(ops.cast(taken, "float32"), axis=-1)  # (G, S)
    real = experts_per_token if weights is None else ops.where(weights > 0, experts_per_token, math.inf)
    largest = experts_per_token if weights is None else ops.where(weights > 0, experts_per_token, -math.inf)
    finite = top_scores > 0.5 * PADDING_SCORE  # Not slots a padding token would have had.
    metrics = {
        "dropped_tokens": token_mean(ops.cast(experts_per_token == 0, "float32"), weights),
        "experts_per_token_min": moe_ops.amin(real, axis=1),
        "experts_per_token_max": moe_ops.amax(largest, axis=1),
        "min_selected_gate": moe_ops.amin(ops.where(finite, top_scores, math.inf), axis=(1, 2)),
        "max_selected_gate": moe_ops.amax(ops.where(finite, top_scores, -math.inf), axis=(1, 2)),
    }
    thresholds = sorted({2**i for i in range(int(math.log2(num_experts)) + 1)} | {num_experts})
    for t in thresholds:
        metrics[f"tokens_with_at_least_{t}_experts"] = token_mean(
            ops.cast(experts_per_token >= t, "float32"), weights
        )
    return metrics
