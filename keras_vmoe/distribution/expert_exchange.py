"""Expert parallelism inside a MoE layer: groups to devices, slots to experts and back.

With a `keras.distribution.ModelParallel` whose layout map has a layout for
`<moe layer path>/dispatched`, the (E, slots, D) expert inputs, with E on an
"expert" mesh axis, a MoE layer runs vmoe's scheme (vmoe/moe.py, `_dispatch`
and `_receive`) through sharding constraints (`keras.distribution.
distribute_tensor`, a `with_sharding_constraint` under `jit` on JAX):

1. its routing groups are split over the batch and expert axes; the input
   is replicated over the expert axis, so each device just keeps its share;
2. each device routes and dispatches its own groups, (G, E, C, D);
3. one all-to-all on the expert axis hands every expert the slots of all
   groups, (E, G * C, D), and the experts run where their weights live;
4. the reverse all-to-all brings the outputs back to the groups' devices,
   where each group combines its own tokens;
5. the combined tokens go back to the layout Keras gives activations (over
   the batch axis only, replicated over the expert axis): an all-gather of
   the layer's output over the expert axis (none when the expert axis is
   also the batch axis, vmoe's layout on a 1-D mesh).

The expert weights are never gathered.
"""

import math

import keras
from keras import ops

from keras_vmoe.ops import group_local

DISPATCHED = "dispatched"


def dispatched_layout(layer):
    """The `TensorLayout` of `layer`'s (E, G * C, D) expert inputs, or None.

    None unless a distribution is active on JAX and its layout map has a key
    that matches `<layer.path>/dispatched` (DataParallel has none).
    """
    distribution = keras.distribution.distribution()
    # Only JAX shards (Keras 3.15); TensorFlow's prototype has no distribute_tensor.
    if distribution is None or keras.backend.backend() != "jax":
        return None
    return distribution.get_tensor_layout(f"{layer.path}/{DISPATCHED}")


class ExpertExchange:
    """Sharding constraints that turn dispatch and combine into all-to-alls.

    Built from the layout of the (E, G * C, D) expert inputs: its first axis
    names the expert mesh axis, its second (or None) the batch mesh axis.
    Groups split as (batch shards, expert shards, G'), in this order, so that
    each device keeps a contiguous block of the groups its batch shard holds.
    """

    def __init__(self, layout, num_groups, num_experts):
        mesh = layout.device_mesh
        sizes = dict(zip(mesh.axis_names, mesh.shape))
        expert_axis, batch_axis = layout.axes[0], layout.axes[1]
        self.mesh = mesh
        self.layout = layout
        self.expert_axis = expert_axis
        self.num_expert_shards = sizes[expert_axis]
        # (mesh axis, size) of each leading split of the groups.
        self.group_split = [(expert_axis, self.num_expert_shards)]
        if batch_axis is not None and batch_axis != expert_axis:
            self.group_split.insert(0, (batch_axis, sizes[batch_axis]))
        self.num_groups = num_groups
        self.num_experts = num_experts

    @classmethod
    def for_layer(cls, layer, num_groups):
        """The exchange for `layer` on `num_groups` groups, or None to run
        the layer as on one device (no expert layout, a symbolic or unknown
        number of groups, or groups that do not split evenly over the devices:
        e.g. a last, smaller batch; the result is the same, only slower)."""
        layout = dispatched_layout(layer)
        if layout is None or not isinstance(num_groups, int):
            return None
        if len(layout.axes) != 3:
            raise ValueError(
                f"The layout of '{layer.path}/{DISPATCHED}' is for the (experts, slots, "
                f"hidden) expert inputs and needs 3 axes, e.g. ('expert', 'batch', None); "
                f"got {layout.axes}."
            )
        if layout.axes[0] is None:  # Experts not sharded: nothing to exchange.
            return None
        exchange = cls(layout, num_groups, layer.num_experts)
        if layer.num_experts % exchange.num_expert_shards:
            raise ValueError(
                f"{type(layer).__name__} '{layer.path}': its {layer.num_experts} experts "
                f"do not split over the {exchange.num_expert_shards} devices of mesh axis "
                f"'{exchange.expert_axis}'; the size of the expert axis must divide num_experts."
            )
        if num_groups % math.prod(size for _, size in exchange.group_split):
            return None
        return exchange

    def _constrain(self, x, axes):
        return keras.distribution.distribute_tensor(x, keras.distribution.TensorLayout(axes, self.mesh))

    def _split_groups(self, x):
        """(G, ...) -> (*group_split, G', ...), constrained to the group split."""
        sizes = [size for _, size in self.group_split]
        x = ops.reshape(x, (*sizes, -1, *ops.shape(x)[1:]))
        axes = [axis for axis, _ in self.group_split]
        return self._constrain(x, (*axes, *[None] * (len(x.shape) - len(axes))))

    def _as_data(self, x):
        """x (G, ...) laid out like the data: groups over the batch axis only
        (or the expert axis, when it is also the batch axis)."""
        return self._constrain(x, (self.group_split[0][0], *[None] * (len(x.shape) - 1)))

    def split_groups(self, tokens):
        """(G, S, D) tokens, each device keeping its own groups (no data moves:
        the input is already replicated over the expert axis). Pinned to the
        data layout first, so that in the backward pass the gradient is
        gathered back here and not propagated split through the model."""
        tokens = self._as_data(tokens)
        return ops.reshape(self._split_groups(tokens), ops.shape(tokens))

    def to_experts(self, slots):
        """(G, E, C, D) slots, sharded by group -> (E, G * C, D), by expert."""
        num_groups, num_experts, capacity, dim = ops.shape(slots)
        shards = self.num_expert_shards
        x = self._split_groups(slots)  # (*split, G', E, C, D)
        n = len(self.group_split) + 1  # Group axes, G' included.
        x = ops.reshape(x, (*x.shape[:n], shards, num_experts // shards, capacity, dim))
        # (*split, G', X, E/X, C, D) -> (X, E/X, *split, G', C, D): the expert
        # axis moves from a group dimension to an expert dimension: all-to-all.
        x = ops.transpose(x, (n, n + 1, *range(n), n + 2, n + 3))
        x = self._constrain(x, self._expert_major_axes(len(x.shape)))
        x = ops.reshape(x, (num_experts, num_groups * capacity, dim))
        return keras.distribution.distribute_tensor(x, self.layout)

    def from_experts(self, outputs, capacity):
        """(E, G * C, D) expert outputs -> (G, E, C, D), sharded by group."""
        num_experts, _, dim = ops.shape(outputs)
        shards = self.num_expert_shards
        outputs = keras.distribution.distribute_tensor(outputs, self.layout)
        sizes = [size for _, size in self.group_split]
        x = ops.reshape(outputs, (shards, num_experts // shards, *sizes, -1, capacity, dim))
        x = self._constrain(x, self._expert_major_axes(len(x.shape)))
        n = len(self.group_split) + 1
        x = ops.transpose(x, (*range(2, n + 2), 0, 1, n + 2, n + 3))
        axes = [axis for axis, _ in self.group_split]
        x = self._constrain(x, (*axes, *[None] * (len(x.shape) - len(axes))))
        return ops.reshape(x, (self.num_groups, num_experts, capacity, dim))

    def gather_groups(self, outputs):
        """(G, S, D) combined outputs, computed where their groups are, then
        laid out like the layer's input (replicated over the expert axis, as
        Keras lays out the data; no move when the expert axis is the batch
        axis). Left free, the compiler kept the split layout downstream and
        paid for it elsewhere (it gathered the images for the patch
        embedding's gradient), or gathered the combine's K-times larger
        inputs instead of its outputs."""
        outputs = ops.reshape(self._split_groups(outputs), ops.shape(outputs))
        return self._as_data(outputs)

    def _expert_major_axes(self, rank):
        """Axes of (X, E/X, *split, G', C, D): experts on the expert axis,
        groups on the batch axis (if the groups are split over one)."""
        batch = [axis for axis, _ in self.group_split[:-1]]
        return (self.expert_axis, None, *batch, *[None] * (rank - 2 - len(batch)))

    def sparse_moe(self, tokens, plan, experts):
        """`keras_vmoe.ops.sparse_moe` with the slots exchanged between devices."""
        slots = group_local.dispatch(tokens, plan.dispatch_index)  # (G, E, C, D)
        capacity = ops.shape(slots)[2]
        outputs = self.from_experts(experts(self.to_experts(slots)), capacity)
        return self.gather_groups(group_local.combine(outputs, plan.combine_index, plan.combine_weights))

    def soft_moe(self, tokens, dispatch_weights, combine_weights, experts):
        """`keras_vmoe.ops.soft_moe` with the slots exchanged between devices."""
        slots = group_local.soft_dispatch(tokens, dispatch_weights)  # (G, E, P, D)
        num_slots = ops.shape(slots)[2]
        outputs = self.from_experts(experts(self.to_experts(slots)), num_slots)
        return self.gather_groups(group_local.soft_combine(outputs, combine_weights))
