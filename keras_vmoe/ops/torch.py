"""PyTorch overrides, each measured faster than `generic` by `benchmarks/moe_layer.py`.

PyTorch runs eagerly under Keras, so shapes may depend on the routing:
`sparse_moe` runs each expert on its occupied slots only (a per-expert
matmul loop; on this CPU faster than `bmm` and than `F.grouped_mm`, which
pays off on GPUs), so empty capacity costs nothing; below `PADDED_SLOTS`
capacity slots (one small image) the padded `bmm` path costs less. Under `torch.compile`
(Keras' `jit_compile=True`) it keeps static shapes instead: the per-expert
counts would be a device-to-host copy and a graph break. On CUDA in
bfloat16 the experts run as one `F.grouped_mm` (`grouped_dense`). The rest saves passes
over memory: `index_select` instead of Keras' embedding-based `take`, the
expert bias fused into `baddbmm`, and the K-way combine as one batched
(1 x K) @ (K x D) product. Eagerly, each Keras op costs tens of microseconds
of dispatch whatever its size: `top_k_experts_plan` builds a token-choice
plan's tables in 20-odd torch calls instead of the reference's 50-odd Keras ops.
"""

import keras
import torch
import torch.nn.functional as F
from keras import ops
from keras.src.backend.torch.core import get_device

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


# At or below this many capacity slots (G x E x C) the padded path (two
# `baddbmm`) beats the per-expert loop, whose fixed cost (2 E matmuls through
# Keras, then stacking E weight gradients) outweighs the empty slots it skips.
# Measured with SparseMoE, E = 8, K = 2, capacity factor 1, one thread: padded
# 4% / 13% faster (forward / training step) at 128 slots, even at 2,048, the
# loop 16% faster at 8,192.
PADDED_SLOTS = 2048


def sparse_moe(tokens, plan, experts):
    if torch.compiler.is_compiling() or generic.static_num_slots(plan) <= PADDED_SLOTS:
        # Static shapes (under compile: no counts on the host).
        return generic.sparse_moe(tokens, plan, experts, dispatch=dispatch, combine=combine)
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


def amax(x, axis=None, keepdims=False):
    """`keras.ops.max`; Keras' own checks the result's type, a graph break."""
    x = ops.convert_to_tensor(x)
    return torch.amax(x, dim=() if axis is None else axis, keepdim=keepdims)


def amin(x, axis=None, keepdims=False):
    x = ops.convert_to_tensor(x)
    return torch.amin(x, dim=() if axis is None else axis, keepdim=keepdims)


def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
    """`keras.random.normal`; under `torch.compile` drawn from torch's global
    generator (Keras draws a seed on the host, a graph break), which
    `keras.utils.set_random_seed` seeds: the same distribution, another
    stream than the layer's `SeedGenerator`."""
    if not torch.compiler.is_compiling():
        return keras.random.normal(shape, mean, stddev, dtype, seed)
    dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
    return torch.randn(tuple(shape), dtype=getattr(torch, dtype), device=get_device()) * stddev + mean


def zero_grad(model):
    """`Module.zero_grad` without its `if p.grad is not None` test, which
    `torch.compile` guards on: with it, Keras' compiled train step recompiles
    at every step until dynamo's recompile limit, then runs eagerly."""
    for variable in model.trainable_variables:
        variable.value.grad = None


def clear_losses(model):
    """Empties the layers' `add_loss` lists once the loss has read them, so
    that a compiled train step starts every step with the state it was
    compiled for (empty lists) instead of recompiling for the last step's."""
    model._clear_losses()


def dot_product_attention(query, key, value, mask=None):
    """`keras.ops.dot_product_attention` without Keras' flash-attention probe
    (an object dynamo cannot build: a graph break); PyTorch's
    `scaled_dot_product_attention` still picks its fastest kernel itself."""
    return keras.ops.dot_product_attention(query, key, value, mask=mask, flash_attention=False)


def prefers_grouped_gemm(tokens):
    """`F.grouped_mm` on CUDA, in bfloat16 (its fast kernels' dtype)."""
    tokens = ops.convert_to_tensor(tokens)
    return tokens.is_cuda and tokens.dtype == torch.bfloat16


def grouped_dense(rows, kernel, group_sizes, bias=None):
    rows = ops.convert_to_tensor(rows)
    kernel, group_sizes = ops.convert_to_tensor(kernel).to(rows.dtype), ops.convert_to_tensor(group_sizes)
    if rows.dtype != torch.bfloat16 and (rows.is_cuda or torch.compiler.is_compiling()):
        # `grouped_mm` traces, and runs on CUDA, in bfloat16 only (eager CPU: any float).
        return generic.grouped_dense(rows, kernel, group_sizes, bias)
    offsets = torch.cumsum(group_sizes, 0).to(torch.int32)
    outputs = F.grouped_mm(rows, kernel, offs=offsets)
    if bias is not None:
        experts = generic.row_experts(group_sizes, rows.shape[0])
        outputs = outputs + ops.convert_to_tensor(bias).to(outputs.dtype).index_select(0, experts.long())
    return outputs


def top_k_experts_plan(
    scores, combine_gates, num_selected_experts, capacity, batch_priority, token_mask, renormalize
):
    """`routing_plans.reference_top_k_experts_plan` in torch calls:
    (dispatch_index, combine_index, combine_weights, kept), the same values
    and dtypes, and the same gradients through `combine_gates`."""
    scores, combine_gates = ops.convert_to_tensor(scores), ops.convert_to_tensor(combine_gates)
    num_groups, group_size, num_experts = scores.shape
    k = num_selected_experts
    top_scores, top_experts = torch.topk(scores, k)  # (G, S, K)
    top_gates = combine_gates.gather(-1, top_experts)
    mask = None if token_mask is None else ops.convert_to_tensor(token_mask).bool()  # (G, S)
    order = None
    if batch_priority:  # Tokens by decreasing top-1 score, padding last.
        priority = (
            top_scores[..., 0]
            if mask is None
            else top_scores[..., 0].masked_fill(~mask, generic.PADDING_SCORE)
        )
        order = torch.argsort(-priority, dim=-1, stable=True)  # (G, S)
        top_experts_in_order = top_experts.gather(1, order[..., None].expand(-1, -1, k))
    else:
        top_experts_in_order = top_experts
    # (G, K * S), rank-major: every top-1 choice before any top-2.
    choices = top_experts_in_order.transpose(1, 2).reshape(num_groups, -1)
    one_hot = (choices[..., None] == torch.arange(num_experts, device=choices.device)).int()
    if mask is not None:  # Padding takes no slot.
        routed = mask if order is None else mask.gather(1, order)
        one_hot = one_hot * routed.repeat(1, k)[..., None]
    position = ((one_hot.cumsum(1) * one_hot).sum(-1) - 1).view(num_groups, k, group_size).transpose(1, 2)
    if order is not None:  # Back to token order.
        position = position.gather(1, torch.argsort(order, dim=-1)[..., None].expand(-1, -1, k))
    if renormalize:
        top_gates = top_gates / top_gates.sum(-1, keepdim=True)
    kept = position < capacity
    if mask is not None:
        kept = kept & mask[..., None]
    dropped_slot = num_experts * capacity
    combine_index = torch.where(kept, top_experts * capacity + position, dropped_slot).int()
    combine_weights = torch.where(kept, top_gates, torch.zeros((), dtype=top_gates.dtype))
    # The token of each slot: S (empty) unless a kept choice writes it; the
    # dropped ones write the scratch entry E * C, cut off.
    table = torch.full((num_groups, dropped_slot + 1), group_size, dtype=torch.int64, device=scores.device)
    token_ids = torch.arange(group_size, device=scores.device).repeat_interleave(k).expand(num_groups, -1)
    table.scatter_(1, combine_index.reshape(num_groups, -1).long(), token_ids)
    dispatch_index = table[:, :dropped_slot].reshape(num_groups, num_experts, capacity).int()
    return dispatch_index, combine_index, combine_weights, kept
