"""The expert weight banks of a MoE layer and the experts' MLP.

vmoe's layout: `kernel_0` (E, D, H), `bias_0` (E, H), `kernel_1` (E, H, D),
`bias_1` (E, D). The experts take their inputs in three forms, whichever the
active ops (`keras_vmoe.ops`) pass: capacity slots (E, N, D), a list of E
(N_e, D) occupied slots, or `GroupedRows` for a grouped matmul.
"""

import functools

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.distribution.layout_map import check_expert_layouts


def grouped_dense(x, kernel, bias, group_sizes):
    return moe_ops.grouped_dense(x, kernel, group_sizes, bias)


def _dense(x, kernel, bias):
    return ops.matmul(x, kernel) if bias is None else ops.matmul(x, kernel) + bias


class ExpertBank:
    """Mixin of `MoELayer`: builds the banks and runs the experts. Needs
    `num_experts`, `mlp_dim`, `use_bias`, `approximate_gelu`, `dropout`
    and `dispatch_dtype`."""

    def build_experts(self, dim):
        num_experts, hidden = self.num_experts, self.mlp_dim
        check_expert_layouts(self, dim, hidden)  # Under a distribution: E splits evenly.
        # Glorot-uniform per expert: VarianceScaling sees fans E times larger
        # on a (E, fan_in, fan_out) bank, so scale by E.
        initializer = keras.initializers.VarianceScaling(
            scale=float(num_experts), mode="fan_avg", distribution="uniform"
        )
        self.kernel_0 = self.add_weight(
            shape=(num_experts, dim, hidden), initializer=initializer, name="kernel_0"
        )
        self.bias_0 = self.bias_1 = None
        if self.use_bias:
            self.bias_0 = self.add_weight(shape=(num_experts, hidden), initializer="zeros", name="bias_0")
        self.kernel_1 = self.add_weight(
            shape=(num_experts, hidden, dim), initializer=initializer, name="kernel_1"
        )
        if self.use_bias:
            self.bias_1 = self.add_weight(shape=(num_experts, dim), initializer="zeros", name="bias_1")

    def round_to_dispatch_dtype(self, x):
        """Rounds x through `dispatch_dtype` (vmoe's bfloat16 dispatcher casts
        tokens before the dispatch and expert outputs before the combine)."""
        if self.dispatch_dtype is None:
            return x
        return ops.cast(ops.cast(x, self.dispatch_dtype), x.dtype)

    def run_experts(self, expert_inputs, training=None):
        """(E, N, D) -> (E, N, D): each expert's MLP on its own slots.

        Also takes a list of E (N_e, D) inputs, one per expert (backends that
        skip empty slots pass that), and returns the list of their outputs;
        and `GroupedRows` (rows sorted by expert, (M, D), and the (E,) rows
        per expert), returning (M, D) through grouped matmuls.
        """
        grouped = isinstance(expert_inputs, moe_ops.GroupedRows)
        is_list = not grouped and isinstance(expert_inputs, (list, tuple))
        x = expert_inputs.rows if grouped else expert_inputs
        dtype = (x[0] if is_list else x).dtype
        weights = [
            None if w is None else ops.cast(w, dtype)
            for w in (self.kernel_0, self.bias_0, self.kernel_1, self.bias_1)
        ]
        if not is_list:
            dense = moe_ops.expert_dense
            if grouped:  # (M, D) rows; `dense(x, kernel, bias)` through a grouped matmul.
                dense = functools.partial(grouped_dense, group_sizes=expert_inputs.group_sizes)
            return self._expert_mlp(x, dense, *weights, training)
        # Unstacked once: the gradient of E slices would be E full-size kernels.
        per_expert = zip(*(ops.unstack(w) if w is not None else [None] * self.num_experts for w in weights))
        return [
            self._expert_mlp(x, _dense, *expert_weights, training)
            for x, expert_weights in zip(expert_inputs, per_expert)
        ]

    def rounded_experts(self, training):
        """`run_experts` with its outputs rounded through `dispatch_dtype`, as
        the ops' `experts` argument."""

        def experts(inputs):
            outputs = self.run_experts(inputs, training=training)
            if isinstance(outputs, list):
                return [self.round_to_dispatch_dtype(y) for y in outputs]
            return self.round_to_dispatch_dtype(outputs)

        return experts

    def _expert_mlp(self, x, dense, kernel_0, bias_0, kernel_1, bias_1, training):
        h = ops.gelu(dense(x, kernel_0, bias_0), approximate=self.approximate_gelu)
        h = self.dropout(h, training=training)
        return self.dropout(dense(h, kernel_1, bias_1), training=training)
