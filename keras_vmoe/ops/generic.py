"""Reference implementations of the MoE ops, written with `keras.ops` only.

Every backend module in this package may override one of these functions where
a benchmark shows it faster; tests hold each override to this reference.

Shapes use vmoe's letters: G groups, S tokens per group, D hidden size, E
experts, C capacity (slots per expert and group), K selected experts per token
(for expert-choice plans K = E), H expert hidden size.
"""

import collections
import math

from keras import ops

# The rows of a grouped (ragged) matmul: (M, D) rows sorted by expert and
# (E,) rows per expert. `experts` callables take this as their third input
# form (besides (E, N, D) and a list of E (N_e, D)).
GroupedRows = collections.namedtuple("GroupedRows", ["rows", "group_sizes"])

# The score a routing plan gives padding: below any real one. Finite, not
# -inf: tf2onnx's constant folding of a sort over -inf changed the order it
# exported.
PADDING_SCORE = -1e30


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


def static_num_slots(plan):
    """G x E x C capacity slots of `plan`, or None where a dimension is only
    known at run time (a graph traced for any batch size)."""
    shape = tuple(plan.dispatch_index.shape)
    return None if None in shape else math.prod(shape)


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


def row_experts(group_sizes, num_rows):
    """(E,) rows per expert -> (num_rows,) int32 expert of each row (rows
    past the last group: E - 1)."""
    ends = ops.cumsum(ops.cast(group_sizes, "int32"))
    rows = ops.arange(0, num_rows, dtype="int32")
    experts = ops.sum(ops.cast(rows[:, None] >= ends[None, :], "int32"), axis=1)
    return ops.minimum(experts, ops.shape(group_sizes)[0] - 1)


def grouped_dense(rows, kernel, group_sizes, bias=None):
    """Each row through its expert's dense layer: the rows of expert e are
    the e-th run of `group_sizes[e]` rows (a grouped, or ragged, matmul).

    The reference runs every expert on every row and keeps its own rows (E
    times the FLOPs); `jax.lax.ragged_dot` and `torch.nn.functional.
    grouped_mm` do it in one kernel on accelerators.

    Args:
        rows: (M, D_in), sorted by expert.
        kernel: (E, D_in, D_out).
        group_sizes: (E,) int, summing to M.
        bias: optional (E, D_out).

    Returns:
        (M, D_out).
    """
    rows = ops.convert_to_tensor(rows)
    kernel = ops.cast(kernel, rows.dtype)
    num_experts = ops.shape(kernel)[0]
    experts = row_experts(group_sizes, ops.shape(rows)[0])
    outputs = 0.0
    for expert in range(num_experts):
        mine = ops.cast(ops.equal(experts, expert), rows.dtype)[:, None]
        outputs = outputs + mine * ops.matmul(rows, kernel[expert])
    if bias is not None:
        outputs = outputs + ops.take(ops.cast(bias, rows.dtype), experts, axis=0)
    return outputs


def grouped_plan(plan):
    """A plan's kept choices as the rows of a grouped matmul, static shapes.

    The choices are sorted by expert, kept ones first; the first R = min(G *
    S * K, E * G * C) rows are taken (every kept choice is among them: each
    holds a slot), so a grouped matmul computes at most as many rows as the
    capacity-padded dispatch and no empty slot. Rows past the kept choices
    (dropped choices) join the last expert's group, so that no row is left
    undefined; their outputs are discarded.

    Returns:
        token_rows: (R,) int32, the row in the flat (G * S, D) tokens of each
            sorted row.
        group_sizes: (E,) int32, rows per expert, summing to R.
        choice_rows: (G * S * K,) int32, the sorted row of each choice, in
            (g, s, k) order (R - 1 for a dropped choice).
        kept: (G * S * K,) bool, whether a choice holds a slot.
    """
    combine_index = ops.convert_to_tensor(plan.combine_index, "int32")
    num_groups, num_experts, capacity = ops.shape(plan.dispatch_index)
    k = ops.shape(combine_index)[-1]
    choices = ops.reshape(combine_index, (-1,))
    num_choices = ops.shape(choices)[0]
    num_rows = min(num_choices, num_experts * num_groups * capacity)
    kept = choices < num_experts * capacity
    experts = ops.where(kept, choices // capacity, num_experts)  # Dropped: after every expert.
    # Unique keys: any sort is then stable (choices keep their order within an expert).
    order = ops.argsort(experts * num_choices + ops.arange(0, num_choices, dtype="int32"))
    order = ops.cast(order, "int32")
    group_sizes = ops.sum(ops.cast(experts[:, None] == ops.arange(0, num_experts, dtype="int32"), "int32"), 0)
    leftover = num_rows - ops.sum(group_sizes)
    group_sizes = group_sizes + leftover * ops.cast(ops.arange(0, num_experts) == num_experts - 1, "int32")
    choice_rows = ops.minimum(ops.cast(ops.argsort(order), "int32"), num_rows - 1)
    return order[:num_rows] // k, group_sizes, choice_rows, kept


def grouped_sparse_moe(tokens, plan, experts):
    """`sparse_moe` through grouped matmuls: the kept choices only, sorted by
    expert, no capacity padding (`grouped_plan`). Same values as
    `sparse_moe` up to the order of float sums.

    Args and returns as `sparse_moe`; `experts` receives `GroupedRows`.
    """
    num_groups, group_size, dim = ops.shape(tokens)
    k = ops.shape(plan.combine_weights)[-1]
    token_rows, group_sizes, choice_rows, kept = grouped_plan(plan)
    rows = ops.take(ops.reshape(tokens, (-1, dim)), token_rows, axis=0)  # (R, D), by expert
    outputs = ops.take(experts(GroupedRows(rows, group_sizes)), choice_rows, axis=0)  # (G*S*K, D)
    outputs = ops.where(kept[:, None], outputs, 0.0)  # A dropped choice adds nothing (nor a gradient).
    outputs = ops.reshape(outputs, (num_groups, group_size, k, -1))
    return ops.einsum("gskd,gsk->gsd", outputs, ops.cast(plan.combine_weights, outputs.dtype))
