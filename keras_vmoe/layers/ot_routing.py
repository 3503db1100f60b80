"""The optimal-transport routers of "Routers in Vision Mixture of Experts" (Liu et al.).

google-research/vmoe's `projects/sparsity_constrained_ot/` routers, with their
semantics (`../shared/fixtures/vmoe/README_ot_routers_e3.md` states them): a
transport plan between a group's tokens and its experts decides which pairs are
dispatched (vmoe's usual top-K-experts or top-C-tokens dispatchers, run on the
plan), and the combine weight of a dispatched pair is the softmax gate (vmoe's
`use_softmax_combine_weights=True`), not renormalised.

| name | vmoe class | plan |
|---|---|---|
| `sinkhorn_token_choice` | `KLProjectionNoisyTopExpertsPerItemRouter` | Sinkhorn on the logits |
| `sinkhorn_expert_choice` | `KLProjectionNoisyTopItemsPerExpertRouter` | Sinkhorn on the logits |
| `sparse_token_choice` | `KSparseProjectionTransportTopExpertsPerItemRouter` | K-sparse per token |
| `sparse_expert_choice` | `KSparseProjectionTransportTopItemsPerExpertRouter` | C-sparse per expert |
| `sparse_expert_choice` (`projection="dense"`) | `SparseProjectionTransportTopItemsPerExpertRouter` | L2 |

Sinkhorn: marginals 1 per token and S / E per expert; `num_iterations` is the
exact count (vmoe's `maxiter` runs 10 * floor(maxiter / 10) of them, which the
checkpoint converter applies). The sparse routers solve on the softmax gates
with Adam (`max_steps`, `learning_rate`, tolerance 1e-3, as jaxopt's
OptaxSolver) and never add noise, as vmoe's.

vmoe's oddities kept, on purpose:
- Sinkhorn token choice in training takes the plan from the noisy logits but
  the combine weights from the clean softmax; Sinkhorn expert choice uses the
  noisy softmax for both.
- The sparse routers accept `noise_std` and ignore it.
- Batch Priority Routing orders tokens by their top-1 plan value.
"""

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.layers.optimal_transport import semi_dual_plan
from keras_vmoe.layers.optimal_transport import sinkhorn_plan
from keras_vmoe.layers.routing import ExpertChoiceRouter
from keras_vmoe.layers.routing import TokenChoiceRouter
from keras_vmoe.layers.routing import register_router
from keras_vmoe.layers.routing_losses import _weighted_sum
from keras_vmoe.layers.routing_losses import _weights
from keras_vmoe.layers.routing_losses import importance_loss
from keras_vmoe.layers.routing_losses import load_loss
from keras_vmoe.validation import check_choice
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int

COMBINE_WEIGHTS = ("softmax", "plan")


def _no_unsupported_losses(owner, **weights):
    for name, weight in weights.items():
        if weight:
            raise ValueError(
                f"{owner}: `{name}` is not a loss of this router (vmoe's has none); got {weight}."
            )


def _nonzero_statistics(plan, axis, name, token_mask=None):
    """{name_min, name_max, name_avg}: non-zero plan entries counted along
    `axis` of (G, S, E), per group (vmoe's `num_items_per_expert_*` (axis 1) and
    `num_experts_per_item_*` (axis 2) of its k-sparse routers)."""
    counts = ops.sum(ops.cast(plan > 0, "float32"), axis=axis)  # (G, E) or (G, S)
    if axis == 2 and token_mask is not None:  # Per token: real tokens only.
        weights = ops.cast(token_mask, "float32")
        return {
            f"{name}_min": moe_ops.amin(ops.where(weights > 0, counts, float("inf")), axis=1),
            f"{name}_max": moe_ops.amax(counts * weights, axis=1),
            f"{name}_avg": ops.sum(counts * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0),
        }
    return {
        f"{name}_min": moe_ops.amin(counts, axis=1),
        f"{name}_max": moe_ops.amax(counts, axis=1),
        f"{name}_avg": ops.mean(counts, axis=1),
    }


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SinkhornTokenChoiceRouter(TokenChoiceRouter):
    """Token choice on an entropic transport plan (vmoe's `KLProjectionNoisyTopExpertsPerItemRouter`).

    Each token takes its top K experts by the Sinkhorn plan of its group's
    logits (balanced: every expert's column holds about S / E), with capacity,
    top-1-before-top-2 and BPR as `TokenChoiceRouter`; the combine weight of a
    kept choice is the clean softmax gate (`combine_weights="softmax"`, vmoe's
    default) or the plan value (`"plan"`). Losses: importance (clean softmax)
    and, in training, load, with their weights; no GShard or z-loss.

    Args:
        num_iterations: int >= 0. Sinkhorn iterations (vmoe: maxiter 20 -> 20).
        combine_weights: `"softmax"` or `"plan"`.
        Other arguments: as `TokenChoiceRouter`.

    Example:
    >>> router = SinkhornTokenChoiceRouter(num_experts=4, num_selected_experts=2)
    >>> plan, metrics = router(keras.ops.ones((2, 8, 16)))
    >>> tuple(plan.dispatch_index.shape)  # (groups, experts, capacity)
    (2, 4, 4)
    """

    def __init__(self, num_experts, num_iterations=20, combine_weights="softmax", **kwargs):
        super().__init__(num_experts, **kwargs)
        owner = type(self).__name__
        _no_unsupported_losses(
            owner, gshard_loss_weight=self.gshard_loss_weight, z_loss_weight=self.z_loss_weight
        )
        self.num_iterations = check_int("num_iterations", num_iterations, minimum=0, owner=owner)
        self.combine_weights = check_choice("combine_weights", combine_weights, COMBINE_WEIGHTS, owner=owner)

    def route_gates(self, tokens, training, token_mask):
        logits = self.gate_logits(tokens)
        gates = ops.softmax(logits, axis=-1)
        noisy_logits, noise_std = self.add_noise(logits, training)
        plan = sinkhorn_plan(noisy_logits, self.num_iterations, token_mask)
        token_weights = _weights(token_mask)
        metrics = {"importance_loss": importance_loss(gates, token_weights)}
        weighted = [(self.importance_loss_weight, metrics["importance_loss"])]
        if noise_std is not None:
            metrics["load_loss"] = load_loss(
                logits, noisy_logits, noise_std, self.num_selected_experts, token_weights
            )
            weighted.append((self.load_loss_weight, metrics["load_loss"]))
        metrics["auxiliary_loss"] = _weighted_sum(logits, *weighted)
        # vmoe: the clean softmax even in training (its `gates_softmax_noisy`).
        return plan, gates if self.combine_weights == "softmax" else plan, metrics

    def get_config(self):
        config = super().get_config()
        config.update(num_iterations=self.num_iterations, combine_weights=self.combine_weights)
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SinkhornExpertChoiceRouter(ExpertChoiceRouter):
    """Expert choice on an entropic transport plan (vmoe's `KLProjectionNoisyTopItemsPerExpertRouter`).

    Each expert takes the C tokens with the largest Sinkhorn plan values of
    its group; the combine weight is the softmax gate (noisy in training, as
    vmoe) or the plan value. No auxiliary loss.

    Args:
        num_iterations, combine_weights: as `SinkhornTokenChoiceRouter`.
        Other arguments: as `ExpertChoiceRouter`.
    """

    def __init__(self, num_experts, num_iterations=20, combine_weights="softmax", **kwargs):
        super().__init__(num_experts, **kwargs)
        owner = type(self).__name__
        self.num_iterations = check_int("num_iterations", num_iterations, minimum=0, owner=owner)
        self.combine_weights = check_choice("combine_weights", combine_weights, COMBINE_WEIGHTS, owner=owner)

    def route_gates(self, tokens, training, token_mask):
        logits, _ = self.add_noise(self.gate_logits(tokens), training)
        plan = sinkhorn_plan(logits, self.num_iterations, token_mask)
        gates = ops.softmax(logits, axis=-1)
        return plan, gates if self.combine_weights == "softmax" else plan, {}

    def get_config(self):
        config = super().get_config()
        config.update(num_iterations=self.num_iterations, combine_weights=self.combine_weights)
        return config


class _SemiDualSolver:
    """The Adam options of the sparse routers (vmoe's `maxiter`, `adam_lr`)."""

    def _solver_options(self, max_steps, learning_rate, tolerance):
        owner = type(self).__name__
        self.max_steps = check_int("max_steps", max_steps, minimum=1, owner=owner)
        self.learning_rate = check_float("learning_rate", learning_rate, exclusive_minimum=0.0, owner=owner)
        self.tolerance = check_float("tolerance", tolerance, minimum=0.0, owner=owner)

    def _solve(self, similarity, row_mass, column_mass, k):
        return semi_dual_plan(
            similarity, row_mass, column_mass, k, self.max_steps, self.learning_rate, self.tolerance
        )

    def _solver_config(self):
        return dict(max_steps=self.max_steps, learning_rate=self.learning_rate, tolerance=self.tolerance)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SparseTokenChoiceRouter(_SemiDualSolver, TokenChoiceRouter):
    """Token choice on a sparsity-constrained plan (vmoe's
    `KSparseProjectionTransportTopExpertsPerItemRouter`).

    Each token's plan row is a K-sparse distribution over the experts, found
    by the semi-dual of sparsity-constrained OT on the softmax gates with
    balanced expert marginals (S / E each); the token takes its top K plan
    entries (capacity, BPR as `TokenChoiceRouter`), combined with its softmax
    gates. No noise and no auxiliary loss (as vmoe). Metrics add the plan's
    non-zeros: `plan_nonzeros_per_expert_{min,max,avg}` and
    `plan_nonzeros_per_token_{min,max,avg}` (vmoe's `num_items_per_expert_*`,
    `num_experts_per_item_*`).

    Args:
        max_steps: int. Adam steps at most (vmoe's `maxiter`, 20).
        learning_rate: float. Adam's (vmoe's `adam_lr`, 0.01).
        tolerance: float. Stop once a step's gradient norm is at most this (1e-3).
        Other arguments: as `TokenChoiceRouter` (its loss weights unused).
    """

    def __init__(self, num_experts, max_steps=20, learning_rate=1e-2, tolerance=1e-3, **kwargs):
        super().__init__(num_experts, **kwargs)
        self._solver_options(max_steps, learning_rate, tolerance)

    def route_gates(self, tokens, training, token_mask):
        gates = ops.softmax(self.gate_logits(tokens), axis=-1)  # (G, S, E)
        num_groups, group_size, num_experts = ops.shape(gates)
        token_weights = _weights(token_mask)
        token_mass = ops.ones((num_groups, group_size)) if token_weights is None else token_weights
        expert_mass = ops.repeat(
            ops.sum(token_mass, axis=1, keepdims=True) / num_experts, num_experts, axis=1
        )
        # Columns are the tokens (mass 1), rows the experts (mass S / E).
        plan = self._solve(gates, expert_mass, token_mass, self.num_selected_experts)  # (G, S, E)
        metrics = {"auxiliary_loss": ops.zeros((num_groups,), "float32")}
        metrics.update(_nonzero_statistics(plan, 1, "plan_nonzeros_per_expert"))
        metrics.update(_nonzero_statistics(plan, 2, "plan_nonzeros_per_token", token_mask))
        return plan, gates, metrics

    def get_config(self):
        config = super().get_config()
        config.update(self._solver_config())
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SparseExpertChoiceRouter(_SemiDualSolver, ExpertChoiceRouter):
    """Expert choice on a sparsity-constrained plan ("Sparsity-Constrained
    Optimal Transport", Liu, Puigcerver, Blondel; vmoe's
    `KSparseProjectionTransportTopItemsPerExpertRouter`).

    Each expert's plan column is a C-sparse distribution (C its capacity)
    over the group's tokens with mass S / E, and every token has mass 1,
    found by the semi-dual on the softmax gates; each expert takes its top C
    plan entries, combined with their softmax gates. With
    `projection="dense"`, the L2-regularised plan without the sparsity
    constraint (vmoe's `SparseProjectionTransportTopItemsPerExpertRouter`).
    No noise and no auxiliary loss. Metrics: expert choice's, plus (k-sparse)
    `plan_nonzeros_per_expert_{min,max,avg}`.

    Args:
        projection: `"k_sparse"` or `"dense"`.
        max_steps, learning_rate, tolerance: as `SparseTokenChoiceRouter`.
        Other arguments: as `ExpertChoiceRouter`.
    """

    def __init__(
        self, num_experts, projection="k_sparse", max_steps=20, learning_rate=1e-2, tolerance=1e-3, **kwargs
    ):
        super().__init__(num_experts, **kwargs)
        self.projection = check_choice(
            "projection", projection, ("k_sparse", "dense"), owner=type(self).__name__
        )
        self._solver_options(max_steps, learning_rate, tolerance)

    def route_gates(self, tokens, training, token_mask):
        gates = ops.softmax(self.gate_logits(tokens), axis=-1)  # (G, S, E)
        num_groups, group_size, num_experts = ops.shape(gates)
        similarity = ops.transpose(gates, (0, 2, 1))  # Columns are the experts.
        if token_mask is None:
            token_mass = ops.ones((num_groups, group_size))
        else:
            token_mass = ops.cast(token_mask, "float32")
            # Padding never enters a column's support.
            similarity = ops.where(ops.cast(token_mask, "bool")[:, None, :], similarity, -1e9)
        expert_mass = ops.repeat(
            ops.sum(token_mass, axis=1, keepdims=True) / num_experts, num_experts, axis=1
        )
        k = self.capacity(group_size) if self.projection == "k_sparse" else None
        plan = ops.transpose(self._solve(similarity, token_mass, expert_mass, k), (0, 2, 1))
        metrics = {}
        if self.projection == "k_sparse":
            metrics.update(_nonzero_statistics(plan, 1, "plan_nonzeros_per_expert"))
        return plan, gates, metrics

    def get_config(self):
        config = super().get_config()
        config.update(projection=self.projection, **self._solver_config())
        return config


for _name, _cls in (
    ("sinkhorn_token_choice", SinkhornTokenChoiceRouter),
    ("sinkhorn_expert_choice", SinkhornExpertChoiceRouter),
    ("sparse_token_choice", SparseTokenChoiceRouter),
    ("sparse_expert_choice", SparseExpertChoiceRouter),
):
    register_router(_name, _cls)
