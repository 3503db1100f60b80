"""Reference implementations of the MoE ops, written with `keras.ops` only.

Every backend module in this package may override one of these functions where
a benchmark shows it faster; tests hold each override to this reference.

Shapes use vmoe's letters: G groups, S tokens per group, D hidden size, E
experts, C capacity (slots per expert and group), K selected experts per token
(for expert-choice plans K = E), H expert hidden size.
"""

from keras import ops


def dispatch_rows(dispatch_index, group_size):
    """(E * G * C,) row of each expert slot in the flat (G * S + 1, D) tokens.

    Expert-major, like the expert inputs; the extra last row (zeros) serves
    the empty slots. Transposing these indices is cheap, the tokens are not.
    """
    dispatch_index = ops.convert_to_tensor(dispatch_index, "int32")
    num_groups = ops.shape(dispatch_index)[0]
    offsets = ops.arange(0, num_groups, dtype="int32")[:, None, None] * group_size
    rows = ops.where(dispatch_index == group_size, num_groups * group_size, dispatch_index + offsets)
    return ops.reshape(ops.transpose(rows, (1, 0, 2)), (-1,))


def combine_rows(combine_index, num_experts, capacity):
    """(G * S * K,) row of each choice in the flat (E * G * C + 1, D) expert
    outputs; a dropped choice (E * C) points at the extra last row."""
    combine_index = ops.convert_to_tensor(combine_index, "int32")
    num_groups = ops.shape(combine_index)[0]
    groups = ops.arange(0, num_groups, dtype="int32")[:, None, None]
    expert, slot = combine_index // capacity, combine_index % capacity
    rows = (expert * num_groups + groups) * capacity + slot
    rows = ops.where(combine_index == num_experts * capacity, num_experts * num_groups * capacity, rows)
    return ops.reshape(rows, (-1,))


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
    num_experts = ops.shape(dispatch_index)[1]
    flat = ops.concatenate([ops.reshape(tokens, (-1, dim)), ops.zeros((1, dim), tokens.dtype)], axis=0)
    gathered = ops.take(flat, dispatch_rows(dispatch_index, group_size), axis=0)
    return ops.reshape(gathered, (num_experts, -1, dim))


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
    num_experts, num_slots, dim = ops.shape(expert_outputs)
    num_groups, group_size, k = ops.shape(combine_index)
    capacity = num_slots // num_groups
    flat = ops.concatenate(
        [ops.reshape(expert_outputs, (-1, dim)), ops.zeros((1, dim), expert_outputs.dtype)],
        axis=0,
    )
    rows = combine_rows(combine_index, num_experts, capacity)
    gathered = ops.reshape(ops.take(flat, rows, axis=0), (num_groups, group_size, k, dim))
    weights = ops.cast(combine_weights, gathered.dtype)
    return ops.einsum("gskd,gsk->gsd", gathered, weights)


def sparse_moe(tokens, plan, experts, dispatch=dispatch, combine=combine):
    """A sparse MoE MLP on routed tokens: dispatch -> experts -> combine.

    Args:
        tokens: (G, S, D).
        plan: a `RoutingPlan` (dispatch_index, combine_index, combine_weights).
        experts: `experts(inputs)` maps (E, N, D) expert inputs to (E, N, D)
            outputs, and a list of E (N_e, D) inputs, one per expert, to the
            list of their outputs (backends that skip empty slots pass that).
        dispatch, combine: the ops to compose (the active ones by default in
            `keras_vmoe.ops`).

    Returns:
        (G, S, D).
    """
    expert_inputs = dispatch(tokens, plan.dispatch_index)  # (E, G*C, D)
    return combine(experts(expert_inputs), plan.combine_index, plan.combine_weights)


def compact_plan(plan, group_size):
    """The occupied slots of a plan, expert-major, for backends with dynamic shapes.

    Capacity-padded dispatch computes every slot, empty or not; at capacity
    factor 1.25 that is 25% more expert FLOPs than the routed tokens need.
    Backends that run eagerly (or in TensorFlow graphs) can run each expert
    on its occupied slots only.

    Returns:
        token_rows: (N,) row in the flat (G * S, D) tokens of each occupied
            slot, expert by expert.
        choice_rows: (G * S * K,) row in those N slot outputs of each of a
            token's choices; N (a zero row to append) for a dropped choice.
        counts: (E,) occupied slots per expert.
    """
    dispatch_index = ops.convert_to_tensor(plan.dispatch_index, "int32")
    num_groups, num_experts, capacity = ops.shape(dispatch_index)
    rows = dispatch_rows(dispatch_index, group_size)  # (E*G*C,)
    occupied = rows < num_groups * group_size
    token_rows = ops.take(rows, ops.where(occupied)[0], axis=0)
    position = ops.cumsum(ops.cast(occupied, "int32")) - 1
    # Dropped choices (combine row E * G * C) point at row N, after the last.
    position = ops.concatenate([position, position[-1:] + 1], axis=0)
    choice_rows = ops.take(position, combine_rows(plan.combine_index, num_experts, capacity), axis=0)
    counts = ops.sum(ops.reshape(ops.cast(occupied, "int32"), (num_experts, -1)), axis=1)
    return token_rows, choice_rows, counts


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


def soft_moe(
    tokens, dispatch_weights, combine_weights, experts, dispatch=soft_dispatch, combine=soft_combine
):
    """A Soft MoE MLP: slots average the tokens, experts run, tokens average the slots.

    Args:
        tokens: (G, S, D).
        dispatch_weights, combine_weights: (G, S, E, P).
        experts: as in `sparse_moe`: (E, N, D) -> (E, N, D), or a list of E
            (N, D) inputs -> the list of their outputs.
        dispatch, combine: the ops to compose (the active ones by default in
            `keras_vmoe.ops`).

    Returns:
        (G, S, D).
    """
    return combine(experts(dispatch(tokens, dispatch_weights)), combine_weights)
