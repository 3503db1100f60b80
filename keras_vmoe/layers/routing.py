"""Routers: tokens in, a routing plan plus auxiliary losses and metrics out.

One contract for every router: `router(tokens, training=None,
token_mask=None) -> (plan, metrics)`, tokens (G, S, D) in routing groups,
`token_mask` (G, S) bool with False for padding (it takes no slot and is left
out of the losses and metrics), metrics {name: (G,) per group}, among them
`auxiliary_loss`, which the MoE layer adds to the training loss. Sparse
routers return a `RoutingPlan` (index tables), Soft MoE's router a
`SoftRoutingPlan` (weights); `keras_vmoe.layers.routing_plans` builds them.

A router owns only its gating weights; the MoE layer owns the experts. The
semantics are google-research/vmoe's (`vmoe/nn/routing.py`, `vmoe/moe.py`):
gates in float32 whatever the layer's dtype policy, each group routed on its
own, losses per group. A sparse router computes scores and combine gates
(`route_gates`), and a pure function makes the plan; a new router overrides
`route_gates` and keeps the plan code.

The registry `ROUTERS` maps the names `SparseMoE(router=...)`, the
backbones and `upcycle` accept to their classes (`router_class(name)`).
"""

import inspect
import math

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.layers.expert_pools import pooled_gates_and_losses
from keras_vmoe.layers.normalization import l2_normalize
from keras_vmoe.layers.routing_losses import _weighted_sum
from keras_vmoe.layers.routing_losses import _weights
from keras_vmoe.layers.routing_losses import gshard_loss
from keras_vmoe.layers.routing_losses import importance_loss
from keras_vmoe.layers.routing_losses import load_loss
from keras_vmoe.layers.routing_losses import z_loss
from keras_vmoe.layers.routing_plans import RoutingPlan  # noqa: F401 (public here too)
from keras_vmoe.layers.routing_plans import SoftRoutingPlan
from keras_vmoe.layers.routing_plans import compute_capacity
from keras_vmoe.layers.routing_plans import expert_choice_metrics
from keras_vmoe.layers.routing_plans import token_choice_metrics
from keras_vmoe.layers.routing_plans import token_mean
from keras_vmoe.layers.routing_plans import top_c_tokens_plan
from keras_vmoe.layers.routing_plans import top_k_experts_plan
from keras_vmoe.ops.tools import values as values_ops
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int


@keras.saving.register_keras_serializable(package="keras_vmoe")
class Router(keras.layers.Layer):
    """Base class of every router: float32, with vmoe's bias-free gating layer.

    Subclasses implement `call(tokens, training=None, token_mask=None) ->
    (plan, metrics)` (the module docstring states the contract) and
    `capacity(group_size)`, the slots per expert of their plans. The gating
    layer (`kernel`, (D, E), vmoe's `Router/dense`) and the routing noise
    live here; Soft MoE's router replaces the kernel by its slot parameters.

    Class attributes: `drops_tokens` (a sparse plan may leave a token
    without an expert) and `uses_token_modalities` (`call` also takes
    `token_modalities`, as LIMoE's router does).
    """

    drops_tokens = True
    uses_token_modalities = False

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

    def add_noise(self, logits, training, scale=None):
        """vmoe's routing noise: Gaussian, std `noise_std / num_experts` (or
        `noise_std / scale`). Returns (logits, the std used or None)."""
        if not training or self.noise_std == 0.0:
            return logits, None
        std = self.noise_std / (scale or self.num_experts)
        noise = moe_ops.normal(ops.shape(logits), seed=self.seed_generator)
        return logits + std * noise, std

    def capacity(self, group_size):
        raise NotImplementedError

    def check_gates(self, values, what, training):
        """Non-finite gates raise, in eager calls outside training (a traced
        graph has no values to check; in training a NaN loss shows it): they
        would make every routing decision arbitrary."""
        if training or values_ops.all_finite(values) is not False:
            return
        raise ValueError(
            f"{type(self).__name__} {self.name!r}: the {what} hold NaN or infinite values; "
            "check the tokens (and the router's kernel) for non-finite values."
        )

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

    `expert_partitions=P` routes each token within its pool of E / P experts
    (`token_partitions` (G, S) in the call; `expert_pools.py`): E^3, LIMoE.

    `token_mask` (G, S) bool, optional: False marks padding, which is not
    routed (it takes no slot, is combined with weight 0) and is left out of
    the losses and the dropped-token metrics.

    Example:
    >>> router = TokenChoiceRouter(num_experts=4, num_selected_experts=2)
    >>> plan, metrics = router(keras.ops.ones((3, 16, 8)))
    >>> tuple(plan.combine_index.shape)  # (groups, tokens, K)
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
        expert_partitions=1,
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, noise_std=noise_std, seed=seed, **kwargs)
        owner = type(self).__name__
        self.num_selected_experts = check_int(
            "num_selected_experts", num_selected_experts, minimum=1, owner=owner
        )
        self.expert_partitions = check_int("expert_partitions", expert_partitions, minimum=1, owner=owner)
        if self.num_experts % self.expert_partitions:
            raise ValueError(
                f"{owner}: expert_partitions={expert_partitions} must divide num_experts={num_experts} "
                "(every pool gets num_experts / expert_partitions experts)."
            )
        pool = self.num_experts // self.expert_partitions
        if self.num_selected_experts > pool:
            raise ValueError(
                f"{owner}: num_selected_experts (K={num_selected_experts}) cannot exceed "
                + (
                    f"num_experts (E={num_experts})."
                    if self.expert_partitions == 1
                    else f"the {pool} experts of each of the {self.expert_partitions} pools "
                    f"(num_experts={num_experts} / expert_partitions={self.expert_partitions})."
                )
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
            self.capacity_experts(),
            self.capacity_factor,
            self.capacity_rounding,
            self.capacity_multiple_of,
        )

    def capacity_experts(self):  # The experts a group's tokens spread over (E^3's members: all E).
        return self.num_experts

    def call(self, tokens, training=None, token_mask=None, **gate_options):
        """`gate_options` go to `route_gates` (a subclass's extra inputs)."""
        weights = _weights(token_mask)  # (G, S) float or None
        scores, combine_gates, metrics = self.route_gates(tokens, training, token_mask, **gate_options)
        self.check_gates(combine_gates, "gates", training)
        plan, kept = top_k_experts_plan(
            scores,
            combine_gates,
            self.num_selected_experts,
            self.capacity(tokens.shape[1]),
            batch_priority=self.batch_priority,
            token_mask=token_mask,
            renormalize=self.renormalize_combine_weights,
        )
        metrics.update(token_choice_metrics(kept, weights))
        return plan, metrics

    def route_gates(self, tokens, training, token_mask, token_partitions=None):
        """(scores, combine_gates, metrics): what tokens choose their experts
        by, the combine weight of each (token, expert) pair, both (G, S, E),
        and the losses (padding, `token_mask` False, left out). Here both are
        the (noisy, in training) softmax gates."""
        logits = self.gate_logits(tokens)  # (G, S, E)
        gates, metrics = self.softmax_gates_and_losses(
            logits, training, _weights(token_mask), token_partitions
        )
        return gates, gates, metrics

    def softmax_gates_and_losses(self, logits, training, token_weights, token_partitions=None):
        """vmoe's gates and auxiliary losses from (G, S, E) logits: the
        routing gates (noisy in training) and {loss name: (G,)}; with
        `expert_partitions` P > 1, each token's gates over its own pool
        (`token_partitions` (G, S) int) and the losses per pool, (G, P)."""
        if self.expert_partitions == 1:
            return self.gates_and_losses(logits, *self.add_noise(logits, training), token_weights)
        noisy = self.add_noise(logits, training, scale=self.num_experts // self.expert_partitions)
        return pooled_gates_and_losses(self, logits, noisy, token_weights, token_partitions)

    def gates_and_losses(self, logits, noisy_logits, noise_std, token_weights):
        """The gates and {loss: (G,)} over the experts of `logits` (all, or one pool's)."""
        k = self.num_selected_experts
        gates = ops.softmax(logits, axis=-1)
        routing_gates = gates if noise_std is None else ops.softmax(noisy_logits, axis=-1)
        metrics = {
            "importance_loss": importance_loss(gates, token_weights),
            "gshard_loss": gshard_loss(routing_gates, token_weights),
        }
        weighted = [
            (self.gshard_loss_weight, metrics["gshard_loss"]),
            (self.importance_loss_weight, metrics["importance_loss"]),
        ]
        if noise_std is not None:
            metrics["load_loss"] = load_loss(logits, noisy_logits, noise_std, k, token_weights)
            weighted.append((self.load_loss_weight, metrics["load_loss"]))
        if self.z_loss_weight > 0:
            metrics["z_loss"] = z_loss(logits, token_weights)
            weighted.append((self.z_loss_weight, metrics["z_loss"]))
        metrics["auxiliary_loss"] = _weighted_sum(logits, *weighted)
        return routing_gates, metrics

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
            expert_partitions=self.expert_partitions,
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

    def call(self, tokens, training=None, token_mask=None):
        scores, combine_gates, metrics = self.route_gates(tokens, training, token_mask)
        self.check_gates(combine_gates, "gates", training)
        plan, taken, top_scores = top_c_tokens_plan(
            scores, combine_gates, self.capacity(tokens.shape[1]), token_mask
        )
        metrics.update(expert_choice_metrics(taken, top_scores, token_mask))
        if "auxiliary_loss" not in metrics:
            metrics["auxiliary_loss"] = ops.zeros(ops.shape(scores)[:1], "float32")
        return plan, metrics

    def route_gates(self, tokens, training, token_mask):
        """(scores, combine_gates, metrics), as `TokenChoiceRouter.route_gates`:
        here both are the softmax of the (noisy, in training) logits."""
        logits, _ = self.add_noise(self.gate_logits(tokens), training)
        gates = ops.softmax(logits, axis=-1)  # (G, S, E)
        return gates, gates, {}

    def get_config(self):
        config = super().get_config()
        config.update(
            capacity_factor=self.capacity_factor,
            capacity_rounding=self.capacity_rounding,
            capacity_multiple_of=self.capacity_multiple_of,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftRouter(Router):
    """Soft MoE's router (vmoe `projects/soft_moe/router.py`): slot logits and
    the two softmaxes taken from them, as a `SoftRoutingPlan`.

    Tokens (L2-normalised) meet the slot parameters `mu` (D, E, P)
    (L2-normalised along D); a learned scalar `scale` multiplies whichever
    operand is smaller. From the logits (G, S, E, P), computed once:
    dispatch = softmax over the tokens S, combine = softmax over all E * P
    slots. In training, optional Gaussian logit noise of std `noise_std`.
    Everything runs in float32. Padding (`token_mask` False) gets dispatch
    weight 0 (no slot averages it in) and combine weights 0, and is left out
    of the metrics. Nothing is dropped; there is no auxiliary loss.

    Metrics, per group: `combine_weights_min_mean` / `_max_mean` (the mean
    over tokens of a token's smallest / largest combine weight) and
    `dispatch_weights_min_mean` / `_max_mean` (the mean over slots of a
    slot's smallest / largest dispatch weight), as vmoe reports them.
    """

    drops_tokens = False

    def __init__(self, num_experts, slots_per_expert, noise_std=0.0, seed=None, **kwargs):
        super().__init__(num_experts, noise_std=noise_std, seed=seed, **kwargs)
        self.slots_per_expert = check_int("slots_per_expert", slots_per_expert, minimum=1, owner="SoftRouter")

    def capacity(self, group_size):
        return self.slots_per_expert

    def build(self, input_shape):
        self.mu = self.add_weight(
            shape=(input_shape[-1], self.num_experts, self.slots_per_expert),
            initializer="lecun_normal",
            name="mu",
        )
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, tokens, training=None, token_mask=None):
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
            logits = logits + self.noise_std * moe_ops.normal(ops.shape(logits), seed=self.seed_generator)
        self.check_gates(logits, "slot logits", training)
        real = None if token_mask is None else ops.cast(token_mask, "bool")[:, :, None, None]
        # Padding: a logit far below any real one (not -inf: a group of
        # padding only would divide 0 by 0).
        dispatch_logits = logits if real is None else ops.where(real, logits, -1e30)
        dispatch_weights = ops.softmax(dispatch_logits, axis=1)
        flat = ops.reshape(logits, (num_groups, group_size, -1))
        combine_weights = ops.reshape(ops.softmax(flat, axis=-1), ops.shape(logits))
        if real is not None:
            combine_weights = ops.where(real, combine_weights, 0.0)
        weights = None if token_mask is None else ops.cast(token_mask, "float32")
        dispatch_for_min = dispatch_weights if real is None else ops.where(real, dispatch_weights, math.inf)
        metrics = {
            "auxiliary_loss": ops.zeros((num_groups,), "float32"),
            "combine_weights_min_mean": token_mean(moe_ops.amin(combine_weights, axis=(2, 3)), weights),
            "combine_weights_max_mean": token_mean(moe_ops.amax(combine_weights, axis=(2, 3)), weights),
            "dispatch_weights_min_mean": ops.mean(moe_ops.amin(dispatch_for_min, axis=1), axis=(1, 2)),
            "dispatch_weights_max_mean": ops.mean(moe_ops.amax(dispatch_weights, axis=1), axis=(1, 2)),
        }
        return SoftRoutingPlan(dispatch_weights, combine_weights), metrics

    def get_config(self):
        config = super().get_config()
        config.update(slots_per_expert=self.slots_per_expert)
        return config


ROUTERS = {
    "token_choice": TokenChoiceRouter,
    "expert_choice": ExpertChoiceRouter,
}


def register_router(name, cls):
    """Adds a router class under `name` to the names the layers accept."""
    ROUTERS[name] = cls
    return cls


def router_names():
    """The registered names: V-MoE's two first, then the others, each sorted."""
    return sorted(ROUTERS, key=lambda name: (name not in ("token_choice", "expert_choice"), name))


def router_class(name):
    """The router class registered under `name`; the error lists the known names."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; expected one of {', '.join(map(repr, router_names()))}.")
    return ROUTERS[name]


def router_arguments(cls):
    """The keyword arguments `cls.__init__` takes, its base classes' included."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is keras.layers.Layer:
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters) or klass is Router:
            break
    return names


def make_router(name, shared_options, router_options=None):
    """The router registered as `name`.

    `shared_options`: the routing arguments every MoE layer has
    (`num_selected_experts`, `capacity_factor`, ...); those the class does not
    take are left out (expert choice has no K). `router_options`: arguments of
    this router class only; an unknown one raises, listing the known ones.
    """
    cls = router_class(name)
    known = router_arguments(cls)
    options = {key: value for key, value in shared_options.items() if key in known or key == "name"}
    unknown = sorted(set(router_options or {}) - known)
    if unknown:
        raise ValueError(
            f"router {name!r} ({cls.__name__}) does not take {unknown}; its arguments are {sorted(known)}."
        )
    options.update(router_options or {})
    return cls(**options)
