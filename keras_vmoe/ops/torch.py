"""PyTorch overrides, each measured faster than `generic` by `benchmarks/moe_layer.py`.

PyTorch runs eagerly under Keras, so shapes may depend on the routing:
`sparse_moe` runs each expert on its occupied slots only (a per-expert
matmul loop; on this CPU faster than `bmm` and than `F.grouped_mm`, which
pays off on GPUs), so empty capacity costs nothing. The rest saves passes
over memory: `index_select` instead of Keras' embedding-based `take`, the
expert bias fused into `baddbmm`, and the K-way combine as one batched
(1 x K) @ (K x D) product.
"""

import torch
from keras import ops

from keras_vmoe.ops import generic


def _with_zero_row(x):
    """(N, D) rows of `x` plus a final row of zeros (for empty or dropped slots)."""
    dim = x.shape[-1]
    return torch.cat([x.reshape(-1, dim), x.new_zeros(1, dim)])


def _weighted_choices(slot_outputs, rows, combine_weights):
    """sum_k weight[g, s, k] * slot_outputs[rows[g, s, k]] -> (G, S, D)."""
    num_groups, group_size, k = combine_weights.shape
    gathered = slot_outputs.index_select(0, rows.long()).view(-1, k, slot_outputs.shape[-1])
    weights = combine_weights.to(gathered.dtype).reshape(-1, 1, k)
    return torch.bmm(weights, gathered).view(num_groups, group_size, -1)


def dispatch(tokens, dispatch_index):
    tokens = ops.convert_to_tensor(tokens)
    num_experts = dispatch_index.shape[1]
    rows = generic.dispatch_rows(dispatch_index, tokens.shape[1]).long()
    gathered = _with_zero_row(tokens).index_select(0, rows)
    return gathered.view(num_experts, -1, tokens.shape[-1])


def combine(expert_outputs, combine_index, combine_weights):
    expert_outputs = ops.convert_to_tensor(expert_outputs)
    num_experts, num_slots, _ = expert_outputs.shape
    num_groups = combine_index.shape[0]
    rows = generic.combine_rows(combine_index, num_experts, num_slots // num_groups)
    return _weighted_choices(_with_zero_row(expert_outputs), rows, ops.convert_to_tensor(combine_weights))


def sparse_moe(tokens, plan, experts):
    tokens = ops.convert_to_tensor(tokens)
    token_rows, choice_rows, counts = generic.compact_plan(plan, tokens.shape[1])
    expert_inputs = tokens.reshape(-1, tokens.shape[-1]).index_select(0, token_rows.long())
    chunks = torch.split(expert_inputs, counts.tolist())
    slot_outputs = torch.cat(experts(list(chunks)))
    return _weighted_choices(
        _with_zero_row(slot_outputs), choice_rows, ops.convert_to_tensor(plan.combine_weights)
    )


def expert_dense(inputs, kernel, bias=None):
    inputs, kernel = ops.convert_to_tensor(inputs), ops.convert_to_tensor(kernel)
    if bias is None:
        return torch.bmm(inputs, kernel)
    return torch.baddbmm(ops.convert_to_tensor(bias).unsqueeze(1), inputs, kernel)
