"""LIMoE's per-modality entropy losses and the token-choice router that adds them.

LIMoE ("Multimodal Contrastive Learning with LIMoE", Mustafa et al., 2022)
routes image and text tokens through the same experts. With the V-MoE losses
alone, the minority modality (text) collapses onto few experts and the router
grows unsure, so the paper adds, for each modality m with router
probabilities p(experts | x) over its n_m tokens:

- local entropy, minimised, so that each token picks its experts confidently:
  Omega_local(m) = 1/n_m sum_i H(p(experts | x_i));
- global entropy of the modality's average routing p_m = 1/n_m sum_i p(experts | x_i),
  maximised, but only below a threshold tau so that a modality may settle on
  a subset of the experts: Omega_global(m) = max(0, tau - H(p_m))
  (the paper's max(0, tau + Omega_global) with Omega_global = -H(p_m)).

Both are taken over every token of the modality in the batch (not per routing
group), on the clean gates (before routing noise), like vmoe's importance loss.
"""

import math

import keras
from keras import ops

from keras_vmoe.layers.expert_pools import mean_over_used_pools
from keras_vmoe.layers.expert_pools import pooled_softmax
from keras_vmoe.layers.routing import TokenChoiceRouter
from keras_vmoe.layers.routing_losses import _weights
from keras_vmoe.validation import check_float

PAPER_MODALITIES = ("image", "text")


def entropy(probabilities, axis=-1):
    """Shannon entropy in nats along `axis`, with 0 log 0 = 0."""
    probabilities = ops.convert_to_tensor(probabilities)
    safe = ops.where(probabilities > 0, probabilities, ops.ones_like(probabilities))
    return -ops.sum(probabilities * ops.log(safe), axis=axis)


def local_entropy_loss(gates, modality_mask):
    """Mean routing entropy of the modality's tokens.

    gates: (G, S, E) router probabilities; modality_mask: (G, S) bool.
    Returns a scalar; 0 when the modality has no token.
    """
    gates = ops.convert_to_tensor(gates)
    weights = ops.cast(modality_mask, gates.dtype)
    count = ops.maximum(ops.sum(weights), 1.0)
    return ops.sum(entropy(gates) * weights) / count


def global_entropy_loss(gates, modality_mask, threshold):
    """max(0, threshold - H(mean routing distribution of the modality's tokens)).

    gates: (G, S, E); modality_mask: (G, S) bool. Returns a scalar; 0 when the
    modality has no token.
    """
    gates = ops.convert_to_tensor(gates)
    weights = ops.cast(modality_mask, gates.dtype)
    count = ops.sum(weights)
    mean_gates = ops.sum(gates * weights[..., None], axis=(0, 1)) / ops.maximum(count, 1.0)
    loss = ops.maximum(threshold - entropy(mean_gates), 0.0)
    return ops.where(count > 0, loss, ops.zeros_like(loss))


def _per_modality(name, value, modalities, default):
    """A {modality: float} dict from None (default), a float, or a dict."""
    if value is None:
        value = default
    if not isinstance(value, dict):
        value = {modality: value for modality in modalities}
    unknown = set(value) - set(modalities)
    if unknown:
        raise ValueError(
            f"MultimodalTokenChoiceRouter: {name} names {sorted(unknown)}, which are "
            f"not among the modalities {list(modalities)}."
        )
    return {
        modality: check_float(f"{name}[{modality!r}]", value.get(modality, default), 0.0)
        for modality in modalities
    }


@keras.saving.register_keras_serializable(package="keras_vmoe")
class MultimodalTokenChoiceRouter(TokenChoiceRouter):
    """Token-choice routing with LIMoE's per-modality entropy losses.

    Routes exactly like `TokenChoiceRouter` (top-K, capacity, BPR) over
    tokens of all modalities together, so they compete for the same slots;
    called with `token_modalities` (G, S) int (the index of each token's
    modality in `modalities`, -1 for padding, which is not routed), it adds
    to the auxiliary loss, for each modality, `local_entropy_weights[m] *
    local entropy + global_entropy_weights[m] * thresholded global entropy`,
    and reports them as `<modality>_local_entropy` and
    `<modality>_global_entropy` (the loss terms, before weighting).

    Args:
        num_experts: int. E.
        modalities: names of the modalities, in the order of their indices.
        local_entropy_weights, global_entropy_weights: a float for every
            modality or a {modality: float} dict (missing ones get the
            default, 0.01).
        global_entropy_thresholds: tau in nats, a float or a dict; the global
            loss is 0 once a modality's average routing has entropy tau, i.e.
            spreads over about exp(tau) experts. Default: log(E / 2), half of
            the experts (our choice; the paper does not give its tau).
        **kwargs: `TokenChoiceRouter` arguments (`num_selected_experts`,
            `capacity_factor`, `batch_priority`, loss weights, ...).

        modality_expert_pools: bool. Give every modality its own pool of
            E / len(modalities) experts (VL-MoE's vision and language
            experts): modality i routes only within experts i * E / n ...
            (i + 1) * E / n - 1, as `TokenChoiceRouter(expert_partitions=n)`
            routes E^3 members, and its losses are taken over its own pool.
            As a group usually holds one modality (LIMoE routes them apart),
            the capacity is sized per pool: C = capacity of the group's
            tokens over E / n experts. It then needs `token_modalities`.

    Without `token_modalities` it is a plain `TokenChoiceRouter`.

    Example:
    >>> router = MultimodalTokenChoiceRouter(num_experts=4, batch_priority=True)
    >>> tokens = keras.ops.ones((2, 6, 8))
    >>> modalities = keras.ops.convert_to_tensor([[0, 0, 0, 0, 1, -1]] * 2)
    >>> plan, metrics = router(tokens, token_modalities=modalities)
    >>> sorted(name for name in metrics if "entropy" in name)
    ['image_global_entropy', 'image_local_entropy', 'text_global_entropy', 'text_local_entropy']

    With modality pools, image tokens use experts 0 and 1, text tokens 2 and 3:
    >>> router = MultimodalTokenChoiceRouter(num_experts=4, modality_expert_pools=True)
    >>> plan, metrics = router(keras.random.normal((2, 6, 8)), token_modalities=modalities)
    >>> gates = keras.ops.convert_to_numpy(router.route_gates(
    ...     keras.random.normal((2, 6, 8)), False, None, modalities)[0])
    >>> bool((gates[:, :4, 2:] == 0).all() and (gates[:, 4, :2] == 0).all())
    True
    """

    uses_token_modalities = True

    def __init__(
        self,
        num_experts,
        modalities=PAPER_MODALITIES,
        local_entropy_weights=None,
        global_entropy_weights=None,
        global_entropy_thresholds=None,
        modality_expert_pools=False,
        **kwargs,
    ):
        modalities = tuple(modalities)
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(
                f"MultimodalTokenChoiceRouter: `modalities` must be distinct names, got {modalities}."
            )
        self.modality_expert_pools = bool(modality_expert_pools)
        if self.modality_expert_pools:
            partitions = kwargs.setdefault("expert_partitions", len(modalities))
            if partitions != len(modalities):
                raise ValueError(
                    f"MultimodalTokenChoiceRouter: modality_expert_pools gives each of the "
                    f"{len(modalities)} modalities its own pool, so expert_partitions must be "
                    f"{len(modalities)}, got {partitions}."
                )
        elif kwargs.get("expert_partitions", 1) != 1:
            raise ValueError(
                "MultimodalTokenChoiceRouter: pools of experts are the modalities' "
                "(modality_expert_pools=True), not expert_partitions."
            )
        super().__init__(num_experts, **kwargs)
        self.modalities = modalities
        pool = num_experts // self.expert_partitions
        self.local_entropy_weights = _per_modality(
            "local_entropy_weights", local_entropy_weights, modalities, 0.01
        )
        self.global_entropy_weights = _per_modality(
            "global_entropy_weights", global_entropy_weights, modalities, 0.01
        )
        self.global_entropy_thresholds = _per_modality(
            "global_entropy_thresholds",
            global_entropy_thresholds,
            modalities,
            math.log(max(pool / 2, 1.0)),
        )

    def capacity_experts(self):
        # With modality pools a group's tokens (of one modality, usually) share one pool of E / n.
        return self.num_experts // self.expert_partitions

    def call(self, tokens, training=None, token_mask=None, token_modalities=None):
        if token_modalities is None:
            return super().call(tokens, training=training, token_mask=token_mask)
        token_modalities = ops.cast(token_modalities, "int32")  # (G, S)
        routed = ops.greater_equal(token_modalities, 0)
        if token_mask is not None:
            routed = ops.logical_and(routed, ops.cast(token_mask, "bool"))
        return super().call(tokens, training=training, token_mask=routed, token_modalities=token_modalities)

    def route_gates(self, tokens, training, token_mask, token_modalities=None):
        """Token choice's gates and losses, plus the entropy losses per modality."""
        logits = self.gate_logits(tokens)
        pools = None
        if self.modality_expert_pools:
            if token_modalities is None:
                raise ValueError(
                    f"MultimodalTokenChoiceRouter {self.name!r} has modality_expert_pools: call it "
                    "with `token_modalities` (G, S), each token's modality index (-1 for padding)."
                )
            pools = ops.maximum(ops.cast(token_modalities, "int32"), 0)  # padding is not routed
        weights = _weights(token_mask)
        routing_gates, metrics = self.softmax_gates_and_losses(logits, training, weights, pools)
        if pools is not None:
            metrics = mean_over_used_pools(metrics, pools, weights, self.expert_partitions)
        if token_modalities is None:
            return routing_gates, routing_gates, metrics
        gates = pooled_softmax(logits, pools, self.expert_partitions)  # (G, S, E), clean
        num_groups = ops.shape(tokens)[0]
        auxiliary = metrics["auxiliary_loss"]
        for index, modality in enumerate(self.modalities):
            in_modality = ops.equal(token_modalities, index)
            local = local_entropy_loss(gates, in_modality)
            global_ = global_entropy_loss(gates, in_modality, self.global_entropy_thresholds[modality])
            metrics[f"{modality}_local_entropy"] = ops.broadcast_to(local, (num_groups,))
            metrics[f"{modality}_global_entropy"] = ops.broadcast_to(global_, (num_groups,))
            auxiliary = (
                auxiliary
                + self.local_entropy_weights[modality] * local
                + self.global_entropy_weights[modality] * global_
            )
        metrics["auxiliary_loss"] = auxiliary
        return routing_gates, routing_gates, metrics

    def get_config(self):
        config = super().get_config()
        config.update(
            modalities=list(self.modalities),
            local_entropy_weights=dict(self.local_entropy_weights),
            global_entropy_weights=dict(self.global_entropy_weights),
            global_entropy_thresholds=dict(self.global_entropy_thresholds),
            modality_expert_pools=self.modality_expert_pools,
        )
        return config
