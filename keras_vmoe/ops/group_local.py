"""Dispatch and combine that keep the routing group as the leading axis.

`generic.dispatch` gathers rows of all groups' tokens at once (one flat
gather with global row numbers), which is fastest on one device but that a
sharding compiler cannot split by group. These versions gather inside each
group, (G, S, D) -> (G, E, C, D), so a group's tokens and slots stay on the
device that holds the group; `keras_vmoe.distribution` then moves the slots
to their experts' devices with one all-to-all, as vmoe does.

Letters as in `generic`: G groups, S tokens per group, D hidden size, E
experts, C slots per expert and group, K choices per token.
"""

import keras
from keras import ops


def _with_zero_row(x):
    """(G, N, D) -> (G, N + 1, D): a row of zeros for empty or dropped slots."""
    zeros = ops.zeros_like(x[:, :1])
    return ops.concatenate([x, zeros], axis=1)


def _take_rows(x, index):
    """x: (G, N, D), index: (G, M) in [0, N) -> (G, M, D), per group."""
    return ops.take_along_axis(x, ops.expand_dims(index, -1), axis=1)


def dispatch(tokens, dispatch_index):
    """The tokens each expert slot holds, group by group.

    Args:
        tokens: (G, S, D).
        dispatch_index: (G, E, C) int32 in [0, S]; S marks an empty slot,
            which receives zeros.

    Returns:
        (G, E, C, D).
    """
    num_groups, num_experts, capacity = ops.shape(dispatch_index)
    index = ops.reshape(ops.cast(dispatch_index, "int32"), (num_groups, -1))
    slots = _take_rows(_with_zero_row(tokens), index)  # (G, E*C, D)
    return ops.reshape(slots, (num_groups, num_experts, capacity, -1))


def combine(slot_outputs, combine_index, combine_weights):
    """Weighted sum of the slot outputs each token was routed to, per group.

    Args:
        slot_outputs: (G, E, C, D).
        combine_index: (G, S, K) int32 flat slot `e * C + c` of each choice;
            E * C marks a dropped choice, which adds zero.
        combine_weights: (G, S, K).

    Returns:
        (G, S, D).
    """
    num_groups, num_experts, capacity, dim = ops.shape(slot_outputs)
    _, group_size, k = ops.shape(combine_index)
    flat = ops.reshape(slot_outputs, (num_groups, num_experts * capacity, dim))
    index = ops.reshape(ops.cast(combine_index, "int32"), (num_groups, -1))
    chosen = _take_rows(_with_zero_row(flat), index)  # (G, S*K, D)
    chosen = ops.reshape(chosen, (num_groups, group_size, k, dim))
    return ops.einsum("gskd,gsk->gsd", chosen, ops.cast(combine_weights, chosen.dtype))


def soft_dispatch(tokens, dispatch_weights):
    """tokens (G, S, D), dispatch_weights (G, S, E, P) -> slots (G, E, P, D)."""
    return ops.einsum("gsep,gsd->gepd", ops.cast(dispatch_weights, tokens.dtype), tokens)


def soft_combine(slot_outputs, combine_weights):
    """slot_outputs (G, E, P, D), combine_weights (G, S, E, P) -> (G, S, D)."""
    weights = ops.cast(combine_weights, slot_outputs.dtype)
    return ops.einsum("gsep,gepd->gsd", weights, slot_outputs)


def top_k(x, k):
    """`ops.top_k` along the last axis, as a stable sort (ties: the lower
    index first, as top_k). XLA's TopK is not partitioned by GSPMD / Shardy,
    which gather its whole operand onto every device; a sort is split along
    its other axes."""
    indices = ops.argsort(-x, axis=-1)[..., :k]
    return ops.take_along_axis(x, indices, axis=-1), indices


def scatter_table(destinations, values, table_size):
    """Per group: a (table_size,) table with `values` at `destinations`, -1 elsewhere.

    destinations: (G, N) int in [0, table_size] (table_size is a scratch
    entry, cut off); values: (G, N) int >= 0. Mapped over the groups, so a
    sharding compiler keeps each group's scatter on the group's device (one
    flat scatter with global offsets is gathered onto every device).
    """

    def one_group(group):
        group_destinations, group_values = group
        table = ops.full((table_size + 1,), -1, dtype="int32")
        table = ops.scatter_update(table, ops.expand_dims(group_destinations, -1), group_values)
        return table[:table_size]

    groups = (ops.cast(destinations, "int32"), ops.cast(values, "int32"))
    if keras.backend.backend() == "torch":  # torch.vmap cannot batch an in-place scatter.
        return ops.map(one_group, groups)
    return ops.vectorized_map(one_group, groups)
