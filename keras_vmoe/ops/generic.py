"""Reference implementations of the MoE ops, written with `keras.ops` only.

Every backend module in this package may override one of these functions where
a benchmark shows it faster; tests hold each override to this reference.

Shapes use vmoe's letters: G groups, S tokens per group, D hidden size, E
experts, C capacity (slots per expert and group), K selected experts per token
(for expert-choice plans K = E), H expert hidden size.
"""

from keras import ops


def dispatch(tokens, dispatch_index):
    """Gathers the tokens each expert slot holds.

    Args:
        tokens: (G, S, D) tokens of each group.
        dispatch_index: (G, E, C) int32, the index in [0, S] of the token held
            by each slot; S marks an empty slot, which receives zeros.

    Returns:
        (E, G * C, D) expert inputs, expert-major like vmoe's dispatch.
    """
    num_groups, group_size, dim = ops.shape(tokens)
    _, num_experts, capacity = ops.shape(dispatch_index)
    # A zero row at index S of every group serves the empty slots.
    padded = ops.pad(tokens, [[0, 0], [0, 1], [0, 0]])
    offsets = ops.arange(num_groups, dtype="int32")[:, None, None] * (group_size + 1)
    flat_index = ops.reshape(dispatch_index + offsets, (-1,))
    gathered = ops.take(ops.reshape(padded, (-1, dim)), flat_index, axis=0)
    gathered = ops.reshape(gathered, (num_groups, num_experts, capacity, dim))
    gathered = ops.transpose(gathered, (1, 0, 2, 3))
    return ops.reshape(gathered, (num_experts, num_groups * capacity, dim))


def combine(expert_outputs, combine_index, combine_weights):
    """Weighted sum of the slot outputs each token was routed to.

    Args:
        expert_outputs: (E, G * C, D) outputs of the experts.
        combine_index: (G, S, K) int32 flat slot index `e * C + c` of each of
            a token's choices; E * C marks a dropped choice, which adds zero.
        combine_weights: (G, S, K) weight of each choice (0 where dropped).

    Returns:
        (G, S, D) combined outputs.
    """
    num_experts, _, dim = ops.shape(expert_outputs)
    num_groups, group_size, k = ops.shape(combine_index)
    slots = ops.reshape(expert_outputs, (num_experts, num_groups, -1, dim))
    capacity = ops.shape(slots)[2]
    slots = ops.reshape(ops.transpose(slots, (1, 0, 2, 3)), (num_groups, -1, dim))
    slots = ops.pad(slots, [[0, 0], [0, 1], [0, 0]])
    offsets = ops.arange(num_groups, dtype="int32")[:, None, None] * (
        num_experts * capacity + 1
    )
    flat_index = ops.reshape(combine_index + offsets, (-1,))
    gathered = ops.take(ops.reshape(slots, (-1, dim)), flat_index, axis=0)
    gathered = ops.reshape(gathered, (num_groups, group_size, k, dim))
    weights = ops.cast(combine_weights, gathered.dtype)
    return ops.einsum("gskd,gsk->gsd", gathered, weights)


def expert_dense(inputs, kernel, bias=None):
    """Applies each expert's own dense layer to its inputs.

    Args:
        inputs: (E, N, D_in).
        kernel: (E, D_in, D_out).
        bias: optional (E, D_out).

    Returns:
        (E, N, D_out).
    """
    outputs = ops.matmul(inputs, kernel)
    if bias is not None:
        outputs = outputs + bias[:, None, :]
    return outputs


def soft_dispatch(tokens, dispatch_weights):
    """Every slot takes a weighted average of all tokens of its group.

    Args:
        tokens: (G, S, D).
        dispatch_weights: (G, S, E, P) weights that sum to 1 over S.

    Returns:
        (E, G * P, D) slot inputs, expert-major.
    """
    num_groups, _, dim = ops.shape(tokens)
    _, _, num_experts, slots = ops.shape(dispatch_weights)
    weights = ops.cast(dispatch_weights, tokens.dtype)
    slot_inputs = ops.einsum("gsep,gsd->egpd", weights, tokens)
    return ops.reshape(slot_inputs, (num_experts, num_groups * slots, dim))


def soft_combine(expert_outputs, combine_weights):
    """Every token takes a weighted average of all slot outputs of its group.

    Args:
        expert_outputs: (E, G * P, D).
        combine_weights: (G, S, E, P) weights that sum to 1 over (E, P).

    Returns:
        (G, S, D).
    """
    num_experts, _, dim = ops.shape(expert_outputs)
    num_groups, _, _, slots = ops.shape(combine_weights)
    outputs = ops.reshape(expert_outputs, (num_experts, num_groups, slots, dim))
    weights = ops.cast(combine_weights, outputs.dtype)
    return ops.einsum("gsep,egpd->gsd", weights, outputs)
