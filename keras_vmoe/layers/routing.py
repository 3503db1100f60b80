"""Routers: tokens in, a routing plan plus auxiliary losses and metrics out.

A router owns only its gating weights. `SparseMoE` owns the experts and runs
dispatch -> experts -> combine through `keras_vmoe.ops` with the plan. The
semantics are google-research/vmoe's (`vmoe/nn/routing.py`, `vmoe/moe.py`):

- tokens arrive in groups, (G, S, D), and each group is routed on its own;
- gates are computed in float32 whatever the layer's dtype policy;
- auxiliary losses are computed per group, shape (G,).

A plan is an index table, never a one-hot (G, S, E, C) tensor:
`dispatch_index` (G, E, C) names the token each expert slot holds (S for an
empty slot); `combine_index` (G, S, K) names the flat slot `e * C + c` of each
of a token's K choices (E * C for a dropped choice), with `combine_weights`.
"""

import collections
import math

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.ops import group_local
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int

RoutingPlan = collections.namedtuple(
    "RoutingPlan", ["dispatch_index", "combine_index", "combine_weights"]
)


def compute_capacity(num_tokens, num_experts, capacity_factor, rounding="ceil", multiple_of=4):
    """Slots per expert for `num_tokens` token choices (vmoe's `compute_capacity`).

    `ceil` (or `round`) of `num_tokens * capacity_factor / num_experts`, then
    rounded up to a multiple of `multiple_of` (None or 0: no rounding up).
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


def _token_mean(x, token_weights):
    """Mean over the tokens (axis 1) of (G, S, ...) x; with (G, S) 0/1
    `token_weights`, over the weighted (real) tokens only."""
    if token_weights is None:
        return ops.mean(x, axis=1)
    weights = ops.reshape(token_weights, ops.shape(token_weights) + (1,) * (len(x.shape) - 2))
    count = ops.maximum(ops.sum(token_weights, axis=1), 1.0)
    return ops.sum(x * weights, axis=1) / ops.reshape(count, ops.shape(count) + (1,) * (len(x.shape) - 2))


def importance_loss(gates, token_weights=None):
    """Squared coefficient of variation of the per-expert gate sums.

    gates: (G, S, E) -> (G,). `token_weights` (G, S): 0 leaves a token out.
    """
    if token_weights is not None:
        gates = gates * token_weights[..., None]
    importance = ops.sum(gates, axis=1)
    return (ops.std(importance, axis=-1) / ops.mean(importance, axis=-1)) ** 2


def load_loss(logits, noisy_logits, noise_std, num_selected_experts, token_weights=None):
    """vmoe's load loss: squared coefficient of variation of each expert's
    probability of making a token's top K if the noise were drawn again.

    logits, noisy_logits: (G, S, E); noise_std: the std of the added noise.
    Returns (G,). `token_weights` (G, S): 0 leaves a token out.
    """
    # The K-th largest noisy logit of each token is the bar to clear.
    threshold = moe_ops.top_k(noisy_logits, num_selected_experts)[0][..., -1:]
    noise_required_to_win = (threshold - logits) / noise_std
    # 1 - Phi(z) = erfc(z / sqrt 2) / 2 = (1 - erf(z / sqrt 2)) / 2.
    p = 0.5 * (1.0 - ops.erf(noise_required_to_win / math.sqrt(2.0)))
    p_mean = _token_mean(p, token_weights)
    return (ops.std(p_mean, axis=-1) / ops.mean(p_mean, axis=-1)) ** 2


def gshard_loss(gates, token_weights=None):
    """GShard's balance loss: E^2 * mean_e(mean top-1 share * mean gate).

    gates: (G, S, E) -> (G,). `token_weights` (G, S): 0 leaves a token out.
    """
    num_experts = ops.shape(gates)[-1]
    top1 = moe_ops.one_hot(ops.argmax(gates, axis=-1), num_experts, dtype=gates.dtype)
    loss = ops.mean(
        _token_mean(top1, token_weights) * _token_mean(gates, token_weights), axis=-1
    )
    return loss * float(num_experts**2)


def z_loss(logits):
    """ST-MoE's router z-loss: mean squared log-partition. (G, S, E) -> (G,)."""
    return ops.mean(ops.square(ops.logsumexp(logits, axis=-1)), axis=-1)


def _weighted_sum(*weighted_terms):
    # As vmoe: terms whose weight is 0 are left out, so a loss that is
    # ill-defined in some setting (NaN) cannot leak into the total.
    terms = [weight * term for weight, term in weighted_terms if weight > 0]
    return sum(terms[1:], terms[0]) if terms else None


def _distributed():
    # Under a keras.distribution the groups are sharded over devices: route
    # with ops a sharding compiler splits by group (`ops.group_local`).
    return keras.distribution.distribution() is not None


def _scatter_table(destinations, values, num_groups, table_size):
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


@keras.saving.register_keras_serializable(package="keras_vmoe")
class Router(keras.layers.Layer):
    """Base class: a bias-free float32 gating layer (vmoe's `Router/dense`).

    Subclasses implement `call(tokens, training) -> (plan, metrics)` where
    tokens are (G, S, D) and metrics hold per-group (G,) values; the entry
    `"auxiliary_loss"` is what the MoE layer adds to the training loss.
    """

    def __init__(self, num_experts, noise_std=1.0, seed=None, **kwargs):
        # Routing is computed in float32 even under a mixed precision policy.
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, minimum=1, owner=type(self).__name__)
        self.noise_std = check_float("noise_std", noise_std, minimum=0.0)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.num_experts),
            initializer="lecun_normal",
            name="kernel",
        )

    def gate_logits(self, tokens):
        return ops.matmul(ops.cast(tokens, "float32"), ops.cast(self.kernel, "float32"))

    def add_noise(self, logits, training):
        """vmoe's routing noise: Gaussian, std `noise_std / num_experts`."""
        if not training or self.noise_std == 0.0:
            return logits, None
        std = self.noise_std / self.num_experts
        noise = keras.random.normal(ops.shape(logits), seed=self.seed_generator)
        return logits + std * noise, std

    def capacity(self, group_size):
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(num_experts=self.num_experts, noise_std=self.noise_std, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class TokenChoiceRouter(Router):
    """Every token picks its top K experts (vmoe's `NoisyTopExpertsPerItemRouter`).

    - gates = softmax(tokens @ W) in float32; in training, Gaussian noise of
      std `noise_std / num_experts` is added to the logits and the noisy gates
      drive both the choice and the combine weights;
    - capacity = ceil(group_size * K * capacity_factor / E), rounded up to a
      multiple of `capacity_multiple_of` (4, as vmoe);
    - every top-1 choice is served before any top-2 choice; within a rank,
      earlier tokens first, or with `batch_priority` (BPR) tokens with a larger
      top-1 gate first; a choice whose expert is full is dropped;
    - the combine weight is the chosen expert's gate, not renormalised over
      the top K unless `renormalize_combine_weights`.

    Auxiliary losses, per group: importance (clean gates), load (only with
    noise, i.e. in training), GShard, and optionally the ST-MoE z-loss;
    `auxiliary_loss` is their weighted sum.

    `token_mask` (G, S) bool, optional: False marks padding, which is not
    routed (it takes no slot, is combined with weight 0) and is left out of
    the losses and the dropped-token metrics.

    Example:
    >>> router = TokenChoiceRouter(num_experts=4, num_selected_experts=2)
    >>> plan, metrics = router(keras.ops.ones((3, 16, 8)))
    >>> plan.combine_index.shape  # (groups, tokens, K)
    (3, 16, 2)
    """

    def __init__(
        self,
        num_experts,
        num_selected_experts=1,
        capacity_factor=1.0,
        batch_priority=False,
        noise_std=1.0,
        importance_loss_weight=0.005,
        load_loss_weight=0.005,
        gshard_loss_weight=0.0,
        z_loss_weight=0.0,
        capacity_rounding="ceil",
        capacity_multiple_of=4,
        renormalize_combine_weights=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, noise_std=noise_std, seed=seed, **kwargs)
        owner = "TokenChoiceRouter"
        self.num_selected_experts = check_int(
            "num_selected_experts", num_selected_experts, minimum=1, owner=owner
        )
        if self.num_selected_experts > self.num_experts:
            raise ValueError(
                f"{owner}: num_selected_experts (K={num_selected_experts}) cannot "
                f"exceed num_experts (E={num_experts})."
            )
        self.capacity_factor = check_float(
            "capacity_factor", capacity_factor, exclusive_minimum=0.0, owner=owner
        )
        self.batch_priority = bool(batch_priority)
        self.importance_loss_weight = check_float("importance_loss_weight", importance_loss_weight, 0.0)
        self.load_loss_weight = check_float("load_loss_weight", load_loss_weight, 0.0)
        self.gshard_loss_weight = check_float("gshard_loss_weight", gshard_loss_weight, 0.0)
        self.z_loss_weight = check_float("z_loss_weight", z_loss_weight, 0.0)
        self.capacity_rounding = check_choice("capacity_rounding", capacity_rounding, ("ceil", "round"))
        self.capacity_multiple_of = capacity_multiple_of
        self.renormalize_combine_weights = bool(renormalize_combine_weights)

    def capacity(self, group_size):
        return compute_capacity(
            group_size * self.num_selected_experts,
            self.num_experts,
            self.capacity_factor,
            self.capacity_rounding,
            self.capacity_multiple_of,
        )

    def call(self, tokens, training=None, token_mask=None):
        num_groups, group_size, _ = ops.shape(tokens)
        num_experts, k = self.num_experts, self.num_selected_experts
        capacity = self.capacity(group_size)
        weights = None if token_mask is None else ops.cast(token_mask, "float32")  # (G, S)

        logits = self.gate_logits(tokens)  # (G, S, E)
        gates = ops.softmax(logits, axis=-1)
        noisy_logits, noise_std = self.add_noise(logits, training)
        routing_gates = gates if noise_std is None else ops.softmax(noisy_logits, axis=-1)
        metrics = {
            "importance_loss": importance_loss(gates, weights),
            "gshard_loss": gshard_loss(routing_gates, weights),
        }
        weighted = [
            (self.gshard_loss_weight, metrics["gshard_loss"]),
            (self.importance_loss_weight, metrics["importance_loss"]),
        ]
        if noise_std is not None:
            metrics["load_loss"] = load_loss(logits, noisy_logits, noise_std, k, weights)
            weighted.append((self.load_loss_weight, metrics["load_loss"]))
        if self.z_loss_weight > 0:
            metrics["z_loss"] = z_loss(logits)
            weighted.append((self.z_loss_weight, metrics["z_loss"]))
        auxiliary = _weighted_sum(*weighted)
        metrics["auxiliary_loss"] = (
            ops.zeros((num_groups,), "float32") if auxiliary is None else auxiliary
        )

        top_gates, top_experts = moe_ops.top_k(routing_gates, k)  # (G, S, K)
        top_experts = ops.cast(top_experts, "int32")
        if weights is not None:
            # Padding: gate 0, so BPR serves it last and it combines to 0.
            top_gates = top_gates * weights[..., None]
        if self.batch_priority:
            # Serve tokens in decreasing order of their top-1 gate.
            order = ops.cast(ops.argsort(-top_gates[..., 0], axis=-1), "int32")
            experts_in_order = ops.take_along_axis(
                top_experts, ops.repeat(order[..., None], k, axis=-1), axis=1
            )
        else:
            experts_in_order = top_experts
        # (G, K * S): rank-major, so every top-1 choice precedes any top-2.
        priority = ops.reshape(ops.transpose(experts_in_order, (0, 2, 1)), (num_groups, -1))
        one_hot = moe_ops.one_hot(priority, num_experts, dtype="int32")  # (G, K*S, E)
        if weights is not None:  # Padding takes no slot.
            routed = ops.cast(weights, "int32")
            if self.batch_priority:
                routed = ops.take_along_axis(routed, order, axis=1)
            one_hot = one_hot * ops.tile(routed, (1, k))[..., None]
        # Position of each choice in its expert's buffer.
        position = ops.sum(ops.cumsum(one_hot, axis=1) * one_hot, axis=-1) - 1
        position = ops.transpose(ops.reshape(position, (num_groups, k, group_size)), (0, 2, 1))
        if self.batch_priority:
            inverse = ops.cast(ops.argsort(order, axis=-1), "int32")
            position = ops.take_along_axis(
                position, ops.repeat(inverse[..., None], k, axis=-1), axis=1
            )
        if self.renormalize_combine_weights:
            # After BPR's ordering, which ranks tokens by their raw top-1 gate.
            top_gates = top_gates / ops.sum(top_gates, axis=-1, keepdims=True)
        kept = position < capacity
        if weights is not None:
            kept = ops.logical_and(kept, ops.cast(token_mask, "bool")[..., None])
        dropped_slot = num_experts * capacity
        combine_index = ops.where(kept, top_experts * capacity + position, dropped_slot)
        combine_weights = ops.where(kept, top_gates, ops.zeros_like(top_gates))

        token_ids = ops.repeat(ops.arange(0, group_size, dtype="int32")[None, :, None], k, axis=2)
        token_ids = ops.broadcast_to(token_ids, ops.shape(combine_index))
        table = _scatter_table(
            ops.reshape(combine_index, (num_groups, -1)),
            ops.reshape(token_ids, (num_groups, -1)),
            num_groups,
            dropped_slot,
        )
        dispatch_index = ops.where(table < 0, group_size, table)
        dispatch_index = ops.reshape(dispatch_index, (num_groups, num_experts, capacity))

        kept_float = ops.cast(kept, "float32")
        metrics["dropped_choices"] = 1.0 - ops.mean(_token_mean(kept_float, weights), axis=-1)
        metrics["dropped_tokens"] = _token_mean(
            ops.cast(ops.max(kept_float, axis=-1) == 0, "float32"), weights
        )
        plan = RoutingPlan(dispatch_index, combine_index, combine_weights)
        return plan, metrics

    def get_config(self):
        config = super().get_config()
        config.update(
            num_selected_experts=self.num_selected_experts,
            capacity_factor=self.capacity_factor,
            batch_priority=self.batch_priority,
            importance_loss_weight=self.importance_loss_weight,
            load_loss_weight=self.load_loss_weight,
            gshard_loss_weight=self.gshard_loss_weight,
            z_loss_weight=self.z_loss_weight,
            capacity_rounding=self.capacity_rounding,
            capacity_multiple_of=self.capacity_multiple_of,
            renormalize_combine_weights=self.renormalize_combine_weights,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ExpertChoiceRouter(Router):
    """Every expert picks its top C tokens (vmoe's `NoisyTopItemsPerExpertRouter`,
    "Expert Choice" routing).

    C = ceil(group_size * capacity_factor / E) rounded up to a multiple of 4 by
    default, as vmoe's code does (the expert-choice paper rounds to nearest:
    pass `capacity_rounding="round", capacity_multiple_of=None`). Loads are
    balanced by construction; a token may be taken by 0 to E experts, and its
    combine weight for each is its gate. No auxiliary loss.
    """

    def __init__(
        self,
        num_experts,
        capacity_factor=1.0,
        noise_std=1.0,
        capacity_rounding="ceil",
        capacity_multiple_of=4,
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, noise_std=noise_std, seed=seed, **kwargs)
        self.capacity_factor = check_float(
            "capacity_factor", capacity_factor, exclusive_minimum=0.0, owner="ExpertChoiceRouter"
        )
        self.capacity_rounding = check_choice("capacity_rounding", capacity_rounding, ("ceil", "round"))
        self.capacity_multiple_of = capacity_multiple_of

    def capacity(self, group_size):
        capacity = compute_capacity(
            group_size,
            self.num_experts,
            self.capacity_factor,
            self.capacity_rounding,
            self.capacity_multiple_of,
        )
        if capacity > group_size:
            raise ValueError(
                f"ExpertChoiceRouter: each expert would take C={capacity} tokens "
                f"from groups of {group_size}; C must not exceed the group size. "
                "Lower capacity_factor or raise group_size."
            )
        return capacity

    def call(self, tokens, training=None):
        num_groups, group_size, _ = ops.shape(tokens)
        num_experts = self.num_experts
        capacity = self.capacity(group_size)
        logits, _ = self.add_noise(self.gate_logits(tokens), training)
        gates = ops.softmax(logits, axis=-1)  # (G, S, E)
        # (G, E, C): the tokens each expert takes, best first.
        top_gates, dispatch_index = moe_ops.top_k(ops.transpose(gates, (0, 2, 1)), capacity)
        dispatch_index = ops.cast(dispatch_index, "int32")
        # Token-major view for the combine: (G, S, E) flat slot or E * C.
        slot_ids = ops.reshape(ops.arange(0, num_experts * capacity, dtype="int32"), (1, -1))
        slot_ids = ops.broadcast_to(slot_ids, (num_groups, num_experts * capacity))
        experts = ops.reshape(ops.arange(0, num_experts, dtype="int32"), (1, num_experts, 1))
        destinations = ops.reshape(dispatch_index * num_experts + experts, (num_groups, -1))
        table = _scatter_table(destinations, slot_ids, num_groups, group_size * num_experts)
        table = ops.reshape(table, (num_groups, group_size, num_experts))
        chosen = table >= 0
        combine_index = ops.where(chosen, table, num_experts * capacity)
        combine_weights = ops.where(chosen, gates, ops.zeros_like(gates))
        experts_per_token = ops.sum(ops.cast(chosen, "float32"), axis=-1)
        metrics = {
            "auxiliary_loss": ops.zeros((num_groups,), "float32"),
            "dropped_tokens": ops.mean(ops.cast(experts_per_token == 0, "float32"), axis=1),
            "experts_per_token_min": ops.min(experts_per_token, axis=1),
            "experts_per_token_max": ops.max(experts_per_token, axis=1),
            "min_selected_gate": ops.min(top_gates, axis=(1, 2)),
            "max_selected_gate": ops.max(top_gates, axis=(1, 2)),
        }
        return RoutingPlan(dispatch_index, combine_index, combine_weights), metrics

    def get_config(self):
        config = super().get_config()
        config.update(
            capacity_factor=self.capacity_factor,
            capacity_rounding=self.capacity_rounding,
            capacity_multiple_of=self.capacity_multiple_of,
        )
        return config


ROUTERS = {"token_choice": TokenChoiceRouter, "expert_choice": ExpertChoiceRouter}


def l2_normalize(x, axis, epsilon=1e-6):
    """vmoe's Soft MoE normalisation: `x * rsqrt(sum(x^2) + eps)`."""
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=axis, keepdims=True) + epsilon)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftRouter(keras.layers.Layer):
    """Soft MoE's router (vmoe `projects/soft_moe/router.py`): slot logits and
    the two softmaxes taken from them.

    Tokens (L2-normalised) meet the slot parameters `mu` (D, E, P)
    (L2-normalised along D); a learned scalar `scale` multiplies whichever
    operand is smaller. From the logits (G, S, E, P), computed once:
    dispatch = softmax over the tokens S, combine = softmax over all E * P
    slots. In training, optional Gaussian logit noise of std `noise_std`.
    Everything runs in float32.
    """

    def __init__(self, num_experts, slots_per_expert, noise_std=0.0, seed=None, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.num_experts = check_int("num_experts", num_experts, minimum=1, owner="SoftRouter")
        self.slots_per_expert = check_int(
            "slots_per_expert", slots_per_expert, minimum=1, owner="SoftRouter"
        )
        self.noise_std = check_float("noise_std", noise_std, minimum=0.0)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.mu = self.add_weight(
            shape=(input_shape[-1], self.num_experts, self.slots_per_expert),
            initializer="lecun_normal",
            name="mu",
        )
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, tokens, training=None):
        num_groups, group_size, dim = ops.shape(tokens)
        x = l2_normalize(ops.cast(tokens, "float32"), axis=-1)
        mu = l2_normalize(ops.cast(self.mu, "float32"), axis=0)
        scale = ops.cast(self.scale, "float32")
        # vmoe scales the smaller operand; with an unknown batch, scale mu.
        tokens_size = None if not isinstance(num_groups, int) else num_groups * group_size * dim
        if tokens_size is not None and tokens_size < dim * self.num_experts * self.slots_per_expert:
            x = x * scale
        else:
            mu = mu * scale
        # One (G*S, D) @ (D, E*P) matmul: einsum lowers to transposes on some backends.
        logits = ops.matmul(x, ops.reshape(mu, (dim, -1)))
        logits = ops.reshape(logits, (num_groups, group_size, self.num_experts, self.slots_per_expert))
        if training and self.noise_std > 0:
            noise = keras.random.normal(ops.shape(logits), seed=self.seed_generator)
            logits = logits + self.noise_std * noise
        dispatch_weights = ops.softmax(logits, axis=1)
        flat = ops.reshape(logits, (num_groups, group_size, -1))
        combine_weights = ops.reshape(ops.softmax(flat, axis=-1), ops.shape(logits))
        metrics = {
            "auxiliary_loss": ops.zeros((), "float32"),
            "combine_weights_min_mean": ops.mean(ops.min(combine_weights, axis=(2, 3))),
            "combine_weights_max_mean": ops.mean(ops.max(combine_weights, axis=(2, 3))),
            "dispatch_weights_min_mean": ops.mean(ops.min(dispatch_weights, axis=1)),
            "dispatch_weights_max_mean": ops.mean(ops.max(dispatch_weights, axis=1)),
        }
        return dispatch_weights, combine_weights, metrics

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(
            num_experts=self.num_experts,
            slots_per_expert=self.slots_per_expert,
            noise_std=self.noise_std,
            seed=self.seed,
        )
        return config
