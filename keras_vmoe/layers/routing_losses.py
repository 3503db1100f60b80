"""vmoe's auxiliary routing losses, per routing group: (G, S, E) in, (G,) out.

`token_weights` (G, S), where given, is 1 for a real token and 0 for padding,
which the losses leave out.
"""

import math

from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.layers.routing_plans import token_mean


def squared_variation(values):
    """(std / mean)^2 over the last axis, as var / mean^2: 0 (with zero
    gradients) where every value is 0, e.g. an expert pool without tokens."""
    mean = ops.mean(values, axis=-1)
    safe_mean = ops.where(mean > 0, mean, ops.ones_like(mean))
    return ops.var(values, axis=-1) / ops.square(safe_mean)


def importance_loss(gates, token_weights=None):
    """Squared coefficient of variation of the per-expert gate sums.

    gates: (G, S, E) -> (G,). `token_weights` (G, S): 0 leaves a token out.
    """
    if token_weights is not None:
        gates = gates * token_weights[..., None]
    return squared_variation(ops.sum(gates, axis=1))


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
    return squared_variation(token_mean(p, token_weights))


def gshard_loss(gates, token_weights=None):
    """GShard's balance loss: E^2 * mean_e(mean top-1 share * mean gate).

    gates: (G, S, E) -> (G,). `token_weights` (G, S): 0 leaves a token out.
    """
    num_experts = ops.shape(gates)[-1]
    top1 = moe_ops.one_hot(ops.argmax(gates, axis=-1), num_experts, dtype=gates.dtype)
    loss = ops.mean(token_mean(top1, token_weights) * token_mean(gates, token_weights), axis=-1)
    return loss * float(num_experts**2)


def z_loss(logits, token_weights=None):
    """ST-MoE's router z-loss: mean squared log-partition. (G, S, E) -> (G,).
    `token_weights` (G, S): 0 leaves a token out."""
    return token_mean(ops.square(ops.logsumexp(logits, axis=-1)), token_weights)


def _weights(token_mask):
    """(G, S) float32 weights (1 real token, 0 padding) of a mask, or None."""
    return None if token_mask is None else ops.cast(token_mask, "float32")


def _weighted_sum(like, *weighted_terms):
    """sum(weight * term), (G,); zeros shaped by `like` (G, ...) when no
    weight is positive. As vmoe, terms of weight 0 are left out, so a loss that
    is ill-defined in some setting (NaN) cannot leak into the total."""
    terms = [weight * term for weight, term in weighted_terms if weight > 0]
    if not terms:
        return ops.zeros(ops.shape(like)[:1], "float32")
    return sum(terms[1:], terms[0])
