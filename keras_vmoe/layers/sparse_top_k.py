"""A sparse, differentiable top-k, and the token-choice router whose gates it makes.

"Fast, Differentiable and Sparse Top-k: a Convex Analysis Perspective"
(Sander, Puigcerver, Djolonga, Peyré, Blondel, ICML 2023) relaxes the top-k
mask of x (1 on the k largest entries) to

    y(x) = argmax_{y in [0, 1]^n, sum(y) = k}  <x, y> - (l / p) * ||y||_p^p,

p in (1, 2], which the authors compute by isotonic optimisation (PAV, or
Dykstra's projections on accelerators; google-research `sparse_soft_topk`).
For this mask the isotonic problem has a single pooled block at the boundary
between the k-th and (k+1)-th largest entries, which gives the closed form
used here (checked against PAV in the tests):

    y_i = clip(((x_i - tau)_+ / l) ^ (q - 1), 0, 1),  q = p / (p - 1),

with the scalar tau such that sum(y) = k, found by bisection (exact for p = 2
once the support is known). No sort, so it vectorises over tokens with
`keras.ops`; the gradient is the closed form of the isotonic Jacobian (a custom
gradient on every backend): with c_i = ((q - 1) / l) ((x_i - tau) / l)^(q - 2)
on the entries strictly between 0 and 1 (else 0), dy/dx^T g = c * (g -
sum(c g) / sum(c)).

Properties: y lies in [0, 1] with sum k and keeps the order of x; it equals the
hard top-k mask whenever the k-th and (k+1)-th largest entries differ by at
least l (so as l -> 0), and tends to k/n everywhere as l grows. When they are
closer than l, the entries of the pooled block share the mass: y then has more
than k non-zeros (at most k of them equal to 1).

The router (`"sparse_top_k"`) is token choice with vmoe's capacity, priority
and losses, whose combine gates are y(logits) times the softmax gates: equal
to V-MoE's gates of the K chosen experts whenever the K-th and (K+1)-th logits
are at least l apart, and differentiable through the choice where they are
not. Each token is dispatched to the top K of these gates, so its combine
weights have at most K non-zeros. The paper's MoE experiment code is not
public; applying y to the logits and multiplying by the softmax is our
choice, as is the default l = 0.1.
"""

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.layers.routing import TokenChoiceRouter
from keras_vmoe.layers.routing import register_router
from keras_vmoe.layers.routing_losses import _weights
from keras_vmoe.validation import check_float
from keras_vmoe.validation import check_int


def _threshold(x, k, regularization, exponent, num_bisections):
    """tau (..., 1) with sum_i clip(((x_i - tau)_+ / l)^(q-1), 0, 1) = k.

    The mass is continuous and non-increasing in tau, constant (= k) on the
    gap between the k-th and (k+1)-th largest entries when they are at least l
    apart. Two bisections find the largest tau with mass >= k and the largest
    with mass > k; their midpoint is the solution, or the middle of that gap
    (far from either end, so y is exactly 1 and 0 there, whatever the rounding).
    """

    def mass(tau):
        return ops.sum(_mask(x, tau, regularization, exponent), axis=-1, keepdims=True)

    def bisect(strict):
        low = moe_ops.amin(x, axis=-1, keepdims=True) - regularization  # Every entry 1: mass n >= k.
        high = moe_ops.amax(x, axis=-1, keepdims=True)  # Every entry 0: mass 0 <= k.
        for _ in range(num_bisections):
            middle = 0.5 * (low + high)
            value = mass(middle)
            above = value > k if strict else value >= k
            low = ops.where(above, middle, low)
            high = ops.where(above, high, middle)
        return low

    tau = 0.5 * (bisect(False) + bisect(True))
    if exponent == 1.0:  # p = 2: on its support, tau solves a linear equation.
        ones = x - tau >= regularization
        fractional = ops.logical_and(x - tau > 0, ops.logical_not(ones))
        count = ops.sum(ops.cast(fractional, x.dtype), axis=-1, keepdims=True)
        total = ops.sum(ops.where(fractional, x, 0.0), axis=-1, keepdims=True)
        num_ones = ops.sum(ops.cast(ones, x.dtype), axis=-1, keepdims=True)
        exact = (total - regularization * (k - num_ones)) / ops.maximum(count, 1.0)
        tau = ops.where(count > 0, exact, tau)
    return tau


def _mask(x, tau, regularization, exponent):
    return ops.clip(ops.power(ops.relu(x - tau) / regularization, exponent), 0.0, 1.0)


def sparse_top_k_mask(x, k, regularization=0.1, p=2.0, num_bisections=30):
    """The relaxed top-k mask of `x` along its last axis (see the module docstring).

    Args:
        x: (..., n) float.
        k: int, 1 <= k <= n.
        regularization: float > 0 (the paper's l); 0 is not allowed, use the
            hard top-k instead.
        p: float in (1, 2]: 2 gives a piecewise-linear y, 4/3 a smooth one.
        num_bisections: int. Bisection steps for tau.

    Returns:
        (..., n) float32 in [0, 1], summing to k along the last axis.

    Example:
    >>> y = sparse_top_k_mask(keras.ops.convert_to_tensor([[3.0, 1.0, 0.5, -1.0]]), k=2,
    ...                       regularization=0.6)
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(y)[0]]
    [1.0, 0.917, 0.083, 0.0]
    """
    x = ops.cast(x, "float32")
    n = x.shape[-1]
    check_int("k", k, minimum=1, maximum=n, owner="sparse_top_k_mask")
    regularization = check_float(
        "regularization", regularization, exclusive_minimum=0.0, owner="sparse_top_k_mask"
    )
    p = check_float("p", p, exclusive_minimum=1.0, maximum=2.0, owner="sparse_top_k_mask")
    exponent = 1.0 / (p - 1.0)  # q - 1

    @ops.custom_gradient
    def relaxed(x):
        tau = ops.stop_gradient(_threshold(x, float(k), regularization, exponent, num_bisections))
        y = _mask(x, tau, regularization, exponent)

        def gradient(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            inside = ops.logical_and(y > 0, y < 1)
            slope = (exponent / regularization) * ops.power(
                ops.maximum(x - tau, 1e-30) / regularization, exponent - 1.0
            )
            c = ops.where(inside, slope, 0.0)
            total = ops.sum(c, axis=-1, keepdims=True)
            mean = ops.sum(c * upstream, axis=-1, keepdims=True) / ops.where(total > 0, total, 1.0)
            return c * (upstream - mean)

        return y, gradient

    return relaxed(x)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SparseTopKRouter(TokenChoiceRouter):
    """Token choice with the sparse, differentiable top-K as its gates.

    combine gates = `sparse_top_k_mask(logits, K, regularization, p)` x
    softmax(logits), logits noisy in training as vmoe's; each token takes the
    top K of them (capacity, top-1 before top-2, BPR as `TokenChoiceRouter`),
    with vmoe's auxiliary losses on the softmax gates. Where a token's K-th and
    (K+1)-th logits are closer than `regularization`, the gradient reaches the
    router through the choice itself, which hard top-K's does not.

    Args:
        regularization: float > 0 (the paper's l; default 0.1, our choice).
        p: float in (1, 2] (default 2, Dykstra's case in the paper).
        Other arguments: as `TokenChoiceRouter`.

    Example:
    >>> router = SparseTopKRouter(num_experts=4, num_selected_experts=2)
    >>> plan, metrics = router(keras.ops.ones((2, 8, 16)))
    >>> tuple(plan.combine_weights.shape)
    (2, 8, 2)
    """

    def __init__(self, num_experts, regularization=0.1, p=2.0, **kwargs):
        super().__init__(num_experts, **kwargs)
        owner = type(self).__name__
        self.regularization = check_float(
            "regularization", regularization, exclusive_minimum=0.0, owner=owner
        )
        self.p = check_float("p", p, exclusive_minimum=1.0, maximum=2.0, owner=owner)

    def route_gates(self, tokens, training, token_mask):
        logits = self.gate_logits(tokens)
        gates, metrics = self.softmax_gates_and_losses(logits, training, _weights(token_mask))
        # The same noisy logits the softmax gates came from (vmoe's noise).
        routing_logits = ops.log(ops.maximum(gates, 1e-30))
        mask = sparse_top_k_mask(routing_logits, self.num_selected_experts, self.regularization, self.p)
        gates = mask * gates
        return gates, gates, metrics

    def get_config(self):
        config = super().get_config()
        config.update(regularization=self.regularization, p=self.p)
        return config


register_router("sparse_top_k", SparseTopKRouter)
