"""Routing within pools of experts: E^3 ensemble members, LIMoE's modality pools.

With `TokenChoiceRouter(expert_partitions=P)` (vmoe's E^3 router
`NoisyTopExpertsPerItemEnsembleRouter`) the E experts split into P
contiguous pools of E / P: pool p owns experts p * E / P ... (p + 1) * E / P - 1,
i.e. those columns of the (D, E) router kernel (vmoe's (D, P, E / P) kernel,
reshaped in C order). A token of pool p (`token_partitions` (G, S) int) gets
the softmax of its pool's logits as gates, zero elsewhere, with noise std
`noise_std / (E / P)`, and K <= E / P. The losses are taken per pool, over
its tokens and experts: (G, P). Capacity and dispatch are those of the whole
(S, E) table.
"""

from keras import ops

from keras_vmoe import ops as moe_ops


def pool_size(num_experts, num_pools):
    return num_experts // num_pools


def pool_weights(pools, index, token_weights=None):
    """(G, S) float: 1 for the (real) tokens of pool `index`, else 0."""
    in_pool = ops.cast(ops.equal(ops.cast(pools, "int32"), index), "float32")
    return in_pool if token_weights is None else in_pool * token_weights


def pooled_gates_and_losses(router, logits, noisy, token_weights, pools):
    """Gates (G, S, E), each token's over its own pool, and {loss: (G, P)},
    from a router's (G, S, E) logits and `add_noise` output `noisy`
    ((noisy logits, std), both None in eval); `router.gates_and_losses`
    computes one pool's."""
    num_pools = router.expert_partitions
    if pools is None:
        raise ValueError(
            f"{type(router).__name__} {router.name!r} routes within {num_pools} expert pools: call it "
            f"with `token_partitions` (G, S), each token's pool in 0 .. {num_pools - 1} "
            "(SparseMoE(ensemble_size=...) passes them)."
        )
    noisy_logits, noise_std = noisy
    size = pool_size(logits.shape[-1], num_pools)
    gates, metrics = [], []
    for index in range(num_pools):
        columns = slice(index * size, (index + 1) * size)
        noisy = None if noise_std is None else noisy_logits[..., columns]
        weights = pool_weights(pools, index, token_weights)
        pool_gates, pool_metrics = router.gates_and_losses(logits[..., columns], noisy, noise_std, weights)
        gates.append(pool_gates * pool_weights(pools, index)[..., None])
        metrics.append(pool_metrics)
    stacked = {name: ops.stack([m[name] for m in metrics], axis=-1) for name in metrics[0]}
    return ops.concatenate(gates, axis=-1), stacked


def pooled_softmax(logits, pools, num_pools):
    """Softmax of (G, S, E) `logits` within each token's pool (`pools` (G, S)
    int; None: over all E), zero elsewhere: the clean gates."""
    if pools is None:
        return ops.softmax(logits, axis=-1)
    size = pool_size(logits.shape[-1], num_pools)
    parts = [
        ops.softmax(logits[..., p * size : (p + 1) * size], axis=-1) * pool_weights(pools, p)[..., None]
        for p in range(num_pools)
    ]
    return ops.concatenate(parts, axis=-1)


def mean_over_used_pools(metrics, pools, token_weights, num_pools):
    """(G, P) per-pool losses -> (G,), the mean over the pools that hold
    tokens of the group (an image-only group leaves the text pool empty)."""
    used = ops.stack(
        [moe_ops.amax(pool_weights(pools, p, token_weights), axis=1) for p in range(num_pools)], axis=-1
    )  # (G, P)
    count = ops.maximum(ops.sum(used, axis=-1), 1.0)
    return {name: ops.sum(value * used, axis=-1) / count for name, value in metrics.items()}
