"""TensorFlow overrides, each measured faster than `generic` by `benchmarks/moe_layer.py`.

Keras runs TensorFlow models in two modes: a plain `tf.function` graph (what
`fit` / `predict` use on CPU-only machines, where `jit_compile="auto"` turns
XLA off) and XLA (`jit_compile=True`, the default on GPUs). The ops ask which
one they are traced in:

- in a graph, shapes may depend on the routing: `sparse_moe` runs each
  expert on its occupied slots only (`tf.split` by expert), so empty
  capacity costs nothing (below `PADDED_SLOTS` slots, one small image, the
  padded batched matmul costs less), and the K-way combine is one batched
  (1 x K) @ (K x D) matmul;
- under XLA, shapes are static: every capacity slot is computed, and the
  multiply-and-sum over the K choices fuses into the gather.

In both modes the experts run as one 2-D matmul each, which beats the batched
matmul on CPU, except for Soft MoE's at most `PADDED_SLOTS` slots (one small
image: one batched matmul, 13% / 26% faster forward / training step in a
graph at 128 slots, 23% / even under XLA). Soft MoE's dispatch and combine are
one (E*P, S) @ (S, D) and one (S, E*P) @ (E*P, D) matmul per group
(TensorFlow's einsum goes through transposes).
"""

import tensorflow as tf
from keras import ops
from tensorflow.python.ops import control_flow_util

from keras_vmoe.ops import generic


def in_xla_context():
    """True while tracing a function that XLA compiles (`jit_compile=True`)."""
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def _with_zero_row(x):
    dim = ops.shape(x)[-1]
    return tf.concat([tf.reshape(x, (-1, dim)), tf.zeros((1, dim), x.dtype)], 0)


def _weighted_choices(slot_outputs, rows, combine_weights):
    """sum_k weight[g, s, k] * slot_outputs[rows[g, s, k]] -> (G, S, D)."""
    num_groups, group_size, k = ops.shape(combine_weights)
    dim = ops.shape(slot_outputs)[-1]
    gathered = tf.gather(slot_outputs, rows)
    weights = tf.cast(combine_weights, gathered.dtype)
    if in_xla_context():
        gathered = tf.reshape(gathered, (num_groups, group_size, k, dim))
        return tf.reduce_sum(gathered * weights[..., None], axis=2)
    combined = tf.matmul(tf.reshape(weights, (-1, 1, k)), tf.reshape(gathered, (-1, k, dim)))
    return tf.reshape(combined, (num_groups, group_size, dim))


def combine(expert_outputs, combine_index, combine_weights):
    expert_outputs = ops.convert_to_tensor(expert_outputs)
    num_experts, num_slots, _ = ops.shape(expert_outputs)
    num_groups = ops.shape(combine_index)[0]
    rows = generic.combine_rows(combine_index, num_experts, num_slots // num_groups)
    return _weighted_choices(_with_zero_row(expert_outputs), rows, combine_weights)


# In a graph, at or below this many capacity slots (G x E x C) the padded
# path (one batched matmul per layer) beats the per-expert split, whose
# weight gradients are E slices stacked back. Measured with SparseMoE, E = 8,
# K = 2, capacity factor 1, one thread: padded 10% / 18% faster (forward /
# training step) at 128 slots, even / 11% at 256; the split 11% / -3% at 512
# and 12% / 9% at 8,192. SoftMoE (E = 8, 16 slots each, groups of 64 tokens):
# batched 13% / 26% faster at 128 slots, -5% / 8% at 256, -37% / 2% at 512.
PADDED_SLOTS = 256


def runs_padded(num_slots):
    """Whether a graph runs the padded batched path: a slot count known when
    tracing and at most `PADDED_SLOTS`."""
    return num_slots is not None and num_slots <= PADDED_SLOTS


def sparse_moe(tokens, plan, experts):
    if in_xla_context():
        # Static shapes: every slot; one matmul per expert still beats the batched one.
        def per_expert(inputs):
            return tf.stack(experts(tf.unstack(inputs)))

        return generic.sparse_moe(tokens, plan, per_expert, combine=combine)
    if runs_padded(generic.static_num_slots(plan)):
        return generic.sparse_moe(tokens, plan, experts, combine=combine)
    tokens = ops.convert_to_tensor(tokens)
    num_experts = ops.shape(plan.dispatch_index)[1]
    token_rows, choice_rows, counts = generic.compact_plan(plan, ops.shape(tokens)[1])
    expert_inputs = tf.gather(tf.reshape(tokens, (-1, ops.shape(tokens)[-1])), token_rows)
    chunks = tf.split(expert_inputs, counts, num=num_experts)
    slot_outputs = tf.concat(experts(chunks), 0)
    return _weighted_choices(_with_zero_row(slot_outputs), choice_rows, plan.combine_weights)


def soft_combine(expert_outputs, combine_weights):
    num_experts, _, dim = ops.shape(expert_outputs)
    num_groups, group_size, _, slots = ops.shape(combine_weights)
    outputs = tf.reshape(expert_outputs, (num_experts, num_groups, slots, dim))
    outputs = tf.reshape(tf.transpose(outputs, (1, 0, 2, 3)), (num_groups, -1, dim))
    weights = tf.reshape(tf.cast(combine_weights, outputs.dtype), (num_groups, group_size, -1))
    return tf.matmul(weights, outputs)


def soft_moe(tokens, dispatch_weights, combine_weights, experts):
    tokens = ops.convert_to_tensor(tokens)
    num_groups, group_size, num_experts, slots = ops.shape(dispatch_weights)
    dim = ops.shape(tokens)[-1]
    dispatch_weights = tf.reshape(tf.cast(dispatch_weights, tokens.dtype), (num_groups, group_size, -1))
    slot_inputs = tf.matmul(dispatch_weights, tokens, transpose_a=True)  # (G, E*P, D)
    slot_inputs = tf.reshape(slot_inputs, (num_groups, num_experts, slots, dim))
    slot_inputs = tf.reshape(tf.transpose(slot_inputs, (1, 0, 2, 3)), (num_experts, -1, dim))  # (E, G*P, D)
    if runs_padded(None if slot_inputs.shape[1] is None else num_experts * slot_inputs.shape[1]):
        # One small image: one batched matmul per layer costs less (as sparse_moe's padded path).
        expert_outputs = experts(slot_inputs)
    else:
        # One (G*P, D) matmul per expert; the hidden activations stay per expert.
        expert_outputs = tf.stack(experts(tf.unstack(slot_inputs)))
    return soft_combine(expert_outputs, combine_weights)
