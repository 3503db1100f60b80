"""Routers: capacities, routing plans, auxiliary losses, errors and configs.

Plans are checked against numpy: a token-choice reference that serves every
top-1 choice before any top-2 choice (earlier tokens first, or larger top-1
gate first with batch priority), and expert choice via argsort.
"""

import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_vmoe.layers import ExpertChoiceRouter
from keras_vmoe.layers import RoutingPlan
from keras_vmoe.layers import SoftRouter
from keras_vmoe.layers import TokenChoiceRouter
from keras_vmoe.layers import compute_capacity
from keras_vmoe.layers import routing

try:
    from tests.helpers import to_numpy
except ImportError:  # pragma: no cover - the helper module is optional
    to_numpy = ops.convert_to_numpy

# One expert makes Keras warn about a softmax over an axis of size 1.
pytestmark = pytest.mark.filterwarnings("ignore:You are using a softmax over axis")

# --------------------------------------------------------------------------
# helpers


def np_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def make_router(cls, dim, kernel_seed=0, kernel=None, **kwargs):
    router = cls(**kwargs)
    router.build((None, None, dim))
    if kernel is None:
        kernel = np.random.RandomState(kernel_seed).randn(dim, router.num_experts)
    router.kernel.assign(np.asarray(kernel, "float32"))
    return router


_JITTED = {}


CAPACITY_OPTIONS = ("name", "capacity_factor", "capacity_rounding", "capacity_multiple_of")


def _config_key(router, group_size):
    """What makes two routers trace alike: their config less the name, with
    the capacity options replaced by the capacity they give, and shapes."""
    config = sorted((k, v) for k, v in router.get_config().items() if k not in CAPACITY_OPTIONS)
    shapes = [tuple(v.shape) for v in router.weights]
    return repr(config) + repr(shapes) + repr((group_size, router.capacity(group_size)))


def route(router, tokens, training=False, jit=True, with_gates=False):
    """Calls the router and returns numpy arrays: (plan, metrics), plus the
    router's own float32 clean gates with `with_gates` (the tests break
    near-ties between gates the way the router sees them).

    Under JAX, `jit=True` compiles the call (one compile per router config and
    shape, where eager mode compiles every op for every new shape); the seed
    generator's state is not written back, so noise tests use `jit=False`.
    """

    def run(trainable, non_trainable, x, _router=router):
        outputs = _router.stateless_call(trainable, non_trainable, x, training=training)[0]
        logits = ops.matmul(ops.cast(x, "float32"), trainable[0])
        return outputs, ops.softmax(logits, axis=-1)

    if jit and keras.backend.backend() == "jax":
        import jax

        key = (type(router), _config_key(router, tokens.shape[1]), training)
        if key not in _JITTED:
            _JITTED[key] = jax.jit(run)
        (plan, metrics), gates = _JITTED[key](
            [v.value for v in router.trainable_variables],
            [v.value for v in router.non_trainable_variables],
            tokens,
        )
    else:
        plan, metrics = router(tokens, training=training)
        gates = ops.softmax(router.gate_logits(tokens), axis=-1) if with_gates else None
    plan = RoutingPlan(*[to_numpy(t) for t in plan])
    metrics = {name: to_numpy(value) for name, value in metrics.items()}
    if with_gates:
        return plan, metrics, to_numpy(gates).astype(np.float64)
    return plan, metrics


def expected_capacity(num_tokens, num_experts, capacity_factor, multiple_of=4):
    capacity = math.ceil(num_tokens * capacity_factor / num_experts)
    if multiple_of:
        capacity = -(-capacity // multiple_of) * multiple_of
    return capacity


def reference_token_choice(gates, k, capacity, batch_priority):
    """numpy token-choice routing: (top experts, combine_index, dispatch_index)."""
    num_groups, group_size, num_experts = gates.shape
    top = np.argsort(-gates, axis=-1, kind="stable")[..., :k]  # (G, S, K)
    combine_index = np.full((num_groups, group_size, k), num_experts * capacity)
    dispatch_index = np.full((num_groups, num_experts, capacity), group_size)
    for g in range(num_groups):
        if batch_priority:
            top1 = gates[g, np.arange(group_size), top[g, :, 0]]
            order = np.argsort(-top1, kind="stable")
        else:
            order = np.arange(group_size)
        fill = np.zeros(num_experts, int)
        for rank in range(k):
            for s in order:
                e = top[g, s, rank]
                if fill[e] < capacity:
                    combine_index[g, s, rank] = e * capacity + fill[e]
                    dispatch_index[g, e, fill[e]] = s
                fill[e] += 1
    return top, combine_index, dispatch_index


# --------------------------------------------------------------------------
# 1. compute_capacity


def test_compute_capacity_vmoe_example():
    # vmoe's test: 34 tokens x 2 choices, 4 experts, capacity factor 1.05:
    # ceil(68 * 1.05 / 4) = ceil(17.85) = 18 -> 20 (multiple of 4).
    assert compute_capacity(34 * 2, 4, 1.05) == 20
    assert compute_capacity(34 * 2, 4, 1.05, multiple_of=None) == 18
    assert compute_capacity(34 * 2, 4, 1.05, multiple_of=0) == 18
    assert compute_capacity(34 * 2, 4, 1.05, multiple_of=1) == 18
    assert compute_capacity(34 * 2, 4, 1.05, multiple_of=8) == 24


def test_compute_capacity_ceil_vs_round():
    # 10 * 1.0 / 4 = 2.5 -> ceil 3, round 2 (Python's round-half-even).
    assert compute_capacity(10, 4, 1.0, "ceil", None) == 3
    assert compute_capacity(10, 4, 1.0, "round", None) == 2
    # 11 / 4 = 2.75 -> ceil 3, round 3; 9 / 4 = 2.25 -> ceil 3, round 2.
    assert compute_capacity(11, 4, 1.0, "round", None) == 3
    assert compute_capacity(9, 4, 1.0, "ceil", None) == 3
    assert compute_capacity(9, 4, 1.0, "round", None) == 2
    # Rounding up to the multiple comes after ceil / round.
    assert compute_capacity(9, 4, 1.0, "round", 4) == 4
    assert compute_capacity(17, 4, 1.0, "ceil", 4) == 8
    assert compute_capacity(16, 4, 1.0, "ceil", 4) == 4


def test_compute_capacity_below_one_raises():
    # round(4 * 0.1 / 4) = round(0.1) = 0 slots.
    with pytest.raises(ValueError, match="capacity"):
        compute_capacity(4, 4, 0.1, "round", None)
    with pytest.raises(ValueError, match="at least 1"):
        compute_capacity(4, 4, 0.1, "round", 4)
    # ceil never goes below 1 for a positive capacity factor.
    assert compute_capacity(4, 4, 0.1, "ceil", None) == 1


def test_compute_capacity_unknown_rounding_raises():
    with pytest.raises(ValueError, match="capacity_rounding"):
        compute_capacity(8, 4, 1.0, rounding="floor")


def test_router_capacity_uses_k_and_rounding():
    router = TokenChoiceRouter(num_experts=4, num_selected_experts=2, capacity_factor=1.05)
    assert router.capacity(34) == 20
    router = TokenChoiceRouter(
        num_experts=4, num_selected_experts=2, capacity_factor=1.05, capacity_multiple_of=None
    )
    assert router.capacity(34) == 18
    router = TokenChoiceRouter(
        num_experts=4, capacity_factor=1.0, capacity_rounding="round", capacity_multiple_of=None
    )
    assert router.capacity(10) == 2


# --------------------------------------------------------------------------
# 2. token-choice invariants (property tests)


# Shapes come from small sets: under JAX every new shape costs compilations.
GROUPS = st.sampled_from([1, 2])
GROUP_SIZES = st.sampled_from([5, 8])
EXPERTS = st.sampled_from([1, 2, 4])
SEEDS = st.integers(0, 2**31 - 1)


@settings(max_examples=25, deadline=None)
@given(
    num_groups=GROUPS,
    group_size=GROUP_SIZES,
    num_experts=EXPERTS,
    k_choice=st.sampled_from(["1", "2", "E"]),
    capacity_factor=st.sampled_from([0.25, 0.5, 1.0, "full"]),
    multiple_of=st.sampled_from([None, 4]),
    batch_priority=st.booleans(),
    seed=SEEDS,
)
def test_token_choice_plan_invariants(
    num_groups,
    group_size,
    num_experts,
    k_choice,
    capacity_factor,
    multiple_of,
    batch_priority,
    seed,
):
    k = min(num_experts, int(k_choice)) if k_choice != "E" else num_experts
    # "full": capacity_factor = E / K gives every expert room for every token.
    full = capacity_factor == "full"
    if full:
        capacity_factor = num_experts / k
    dim = 4
    rng = np.random.RandomState(seed)
    tokens = rng.randn(num_groups, group_size, dim).astype("float32")
    kernel = rng.randn(dim, num_experts).astype("float32")
    router = make_router(
        TokenChoiceRouter,
        dim,
        kernel=kernel,
        num_experts=num_experts,
        num_selected_experts=k,
        capacity_factor=capacity_factor,
        capacity_multiple_of=multiple_of,
        batch_priority=batch_priority,
    )
    plan, metrics, gates_f32 = route(router, tokens, with_gates=True)
    capacity = expected_capacity(group_size * k, num_experts, capacity_factor, multiple_of)
    dropped_slot = num_experts * capacity
    G, S, E, C = num_groups, group_size, num_experts, capacity

    # Shapes: no expert table holds more than C tokens.
    assert plan.dispatch_index.shape == (G, E, C)
    assert plan.combine_index.shape == (G, S, k)
    assert plan.combine_weights.shape == (G, S, k)
    assert set(metrics) >= {"auxiliary_loss", "dropped_tokens", "dropped_choices"}
    for value in metrics.values():
        assert value.shape == (G,)

    gates = np_softmax(tokens.astype(np.float64) @ kernel.astype(np.float64))
    top, ref_combine, ref_dispatch = reference_token_choice(gates_f32, k, C, batch_priority)
    kept = plan.combine_index < dropped_slot
    assert np.all((plan.combine_index >= 0) & (plan.combine_index <= dropped_slot))
    assert np.all((plan.dispatch_index >= 0) & (plan.dispatch_index <= S))

    for g in range(G):
        slots = plan.combine_index[g][kept[g]]
        # Each kept (token, k) has a slot of its own.
        assert len(np.unique(slots)) == len(slots)
        # As many filled slots as kept choices, and at most C per expert.
        filled = plan.dispatch_index[g] < S
        assert filled.sum() == len(slots)
        for s in range(S):
            for r in range(k):
                e = top[g, s, r]
                if kept[g, s, r]:
                    slot = plan.combine_index[g, s, r]
                    # token -> slot and slot -> token agree; the slot is e's.
                    assert slot // C == e
                    assert plan.dispatch_index[g, slot // C, slot % C] == s
                    # Combine weight: the (eval-mode) gate of that expert.
                    np.testing.assert_allclose(
                        plan.combine_weights[g, s, r], gates[g, s, e], rtol=1e-4, atol=1e-6
                    )
                else:
                    assert plan.combine_weights[g, s, r] == 0.0
                    # Dropped only because expert e is full.
                    assert np.sum(kept[g] & (top[g] == e)) == C
        # slot -> token: every filled slot names a token choosing that expert.
        for e in range(E):
            for c in range(C):
                s = plan.dispatch_index[g, e, c]
                if s < S:
                    assert plan.combine_index[g, s][top[g, s] == e] == e * C + c
        # Priority order within each (rank, expert).
        top1 = gates_f32[g, np.arange(S), top[g, :, 0]]
        for r in range(k):
            for e in range(E):
                chose = top[g, :, r] == e
                kept_tokens = np.nonzero(chose & kept[g, :, r])[0]
                dropped_tokens = np.nonzero(chose & ~kept[g, :, r])[0]
                if len(kept_tokens) and len(dropped_tokens):
                    if batch_priority:
                        assert top1[kept_tokens].min() >= top1[dropped_tokens].max()
                    else:
                        assert kept_tokens.max() < dropped_tokens.min()

    # The whole plan equals the numpy reference (unless batch priority meets
    # equal top-1 gates, e.g. with one expert, where any order is right).
    top1 = np.take_along_axis(gates_f32, top[..., :1], axis=-1)[..., 0]
    if not batch_priority or all(len(np.unique(t)) == S for t in top1):
        np.testing.assert_array_equal(plan.combine_index, ref_combine)
        np.testing.assert_array_equal(plan.dispatch_index, ref_dispatch)
    # Metrics agree with the plan.
    np.testing.assert_allclose(metrics["dropped_choices"], 1.0 - kept.mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(metrics["dropped_tokens"], (~kept.any(axis=-1)).mean(axis=1), atol=1e-6)
    if full:
        # Nothing is dropped; every token sits once in each of its K experts.
        assert C >= S
        assert kept.all()
        np.testing.assert_allclose(metrics["dropped_choices"], 0.0, atol=1e-6)
        for g in range(G):
            counts = np.bincount(plan.dispatch_index[g].ravel(), minlength=S + 1)
            np.testing.assert_array_equal(counts[:S], k)


def test_token_choice_tiny_capacity_drops():
    # 8 tokens, 2 experts, C = ceil(8 * 0.25 / 2) = 1: at most 2 tokens kept.
    router = make_router(TokenChoiceRouter, 4, num_experts=2, capacity_factor=0.25, capacity_multiple_of=None)
    tokens = np.random.RandomState(1).randn(3, 8, 4).astype("float32")
    plan, metrics = route(router, tokens)
    assert plan.dispatch_index.shape == (3, 2, 1)
    kept = (plan.combine_index < 2).sum(axis=(1, 2))
    assert np.all(kept <= 2)
    np.testing.assert_allclose(metrics["dropped_tokens"], 1.0 - kept / 8.0, atol=1e-6)


# --------------------------------------------------------------------------
# 3. every top-1 choice before any top-2 choice


@pytest.mark.parametrize("batch_priority", [False, True])
def test_top1_choices_served_before_top2(batch_priority):
    # Tokens are their own logits (identity kernel). Expert 1 is the 2nd
    # choice of tokens 0..2 and the 1st choice of the last token, 3.
    logits = np.array([[3.0, 2.0, 0.0], [3.1, 2.0, 0.0], [2.9, 2.0, 0.0], [0.0, 3.05, 2.0]], "float32")[None]
    # C = ceil(4 * 2 * 0.3 / 3) = ceil(0.8) = 1.
    router = make_router(
        TokenChoiceRouter,
        3,
        kernel=np.eye(3),
        num_experts=3,
        num_selected_experts=2,
        capacity_factor=0.3,
        capacity_multiple_of=None,
        batch_priority=batch_priority,
    )
    plan, _ = route(router, logits)
    assert plan.dispatch_index.shape == (1, 3, 1)
    # Expert 1's only slot goes to token 3's 1st choice, not to an earlier
    # token's 2nd choice.
    assert plan.dispatch_index[0, 1, 0] == 3
    assert plan.combine_index[0, 3, 0] == 1
    np.testing.assert_array_equal(plan.combine_index[0, :3, 1], 3)  # dropped
    np.testing.assert_array_equal(plan.combine_weights[0, :3, 1], 0.0)
    # Expert 0: token 0 first without BPR, token 1 (largest top-1 gate) with.
    assert plan.dispatch_index[0, 0, 0] == (1 if batch_priority else 0)
    # Expert 2 (token 3's 2nd choice) is free, so that choice is kept.
    assert plan.dispatch_index[0, 2, 0] == 3
    assert plan.combine_index[0, 3, 1] == 2


def test_batch_priority_orders_by_top1_gate():
    # Four tokens all pick expert 0, with increasing top-1 gates; C = 2.
    logits = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]], "float32")[None]
    kwargs = dict(num_experts=2, capacity_factor=1.0, capacity_multiple_of=None)
    plan, _ = route(make_router(TokenChoiceRouter, 2, kernel=np.eye(2), **kwargs), logits)
    np.testing.assert_array_equal(plan.dispatch_index[0, 0], [0, 1])
    plan, _ = route(
        make_router(TokenChoiceRouter, 2, kernel=np.eye(2), batch_priority=True, **kwargs),
        logits,
    )
    np.testing.assert_array_equal(plan.dispatch_index[0, 0], [3, 2])
    np.testing.assert_array_equal(plan.combine_index[0, :, 0], [4, 4, 1, 0])


# --------------------------------------------------------------------------
# 4. noise only in training


@pytest.mark.parametrize("cls", [TokenChoiceRouter, ExpertChoiceRouter])
def test_noise_only_in_training(cls):
    tokens = np.random.RandomState(0).randn(2, 8, 4).astype("float32")
    router = make_router(cls, 4, num_experts=4, noise_std=1.0, seed=3)
    eval_a, metrics_a = route(router, tokens, training=False, jit=False)
    eval_b, metrics_b = route(router, tokens, jit=False)  # training=None
    for a, b in zip(eval_a, eval_b):
        np.testing.assert_array_equal(a, b)
    for name in metrics_a:
        np.testing.assert_array_equal(metrics_a[name], metrics_b[name])
    train_a, train_metrics = route(router, tokens, training=True, jit=False)
    train_b, _ = route(router, tokens, training=True, jit=False)
    # Noisy gates drive the combine weights in training.
    assert not np.allclose(train_a.combine_weights, eval_a.combine_weights)
    assert not np.allclose(train_a.combine_weights, train_b.combine_weights)
    if cls is TokenChoiceRouter:
        assert "load_loss" not in metrics_a
        assert "load_loss" in train_metrics
        assert np.all(np.isfinite(train_metrics["load_loss"]))


@pytest.mark.parametrize("cls", [TokenChoiceRouter, ExpertChoiceRouter])
def test_zero_noise_training_equals_eval(cls):
    tokens = np.random.RandomState(0).randn(2, 8, 4).astype("float32")
    router = make_router(cls, 4, num_experts=4, noise_std=0.0, seed=3)
    eval_plan, eval_metrics = route(router, tokens, training=False, jit=False)
    train_plan, train_metrics = route(router, tokens, training=True, jit=False)
    for a, b in zip(eval_plan, train_plan):
        np.testing.assert_array_equal(a, b)
    assert set(train_metrics) == set(eval_metrics)
    assert "load_loss" not in train_metrics


# --------------------------------------------------------------------------
# 5. auxiliary losses against hand-computed values

GATES = np.array(
    [
        [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]],
        [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25]],
    ],
    "float32",
)
LOGITS = np.array(
    [
        [[1.0, -0.5, 0.2], [0.3, 2.0, -1.0], [0.0, 0.0, 0.5], [-2.0, 1.0, 1.5]],
        [[3.0, 0.1, -0.1], [0.5, 0.4, 0.3], [-1.0, 2.5, 0.0], [0.2, 0.2, 0.2]],
    ],
    "float32",
)
NOISE = np.array(
    [
        [[0.1, -0.2, 0.3], [-0.4, 0.0, 0.2], [0.3, 0.1, -0.3], [0.0, 0.5, -0.1]],
        [[-0.3, 0.2, 0.1], [0.2, -0.1, 0.0], [0.4, -0.2, 0.3], [0.1, 0.0, -0.2]],
    ],
    "float32",
)


def _cv2(values):
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)  # population
    return variance / mean**2


def test_importance_loss_hand_computed():
    expected = []
    for g in range(2):
        importance = [float(GATES[g, :, e].sum()) for e in range(3)]
        expected.append(_cv2(importance))
    # Group 0: importance (1.5, 1.25, 1.25).
    np.testing.assert_allclose(expected[0], (2 * (1 / 12) ** 2 + (1 / 6) ** 2) / 3 / (4 / 3) ** 2)
    got = to_numpy(routing.importance_loss(GATES))
    assert got.shape == (2,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gshard_loss_hand_computed():
    expected = []
    for g in range(2):
        top1 = GATES[g].argmax(axis=-1)
        total = 0.0
        for e in range(3):
            fraction = float(np.mean(top1 == e))
            mean_gate = float(GATES[g, :, e].mean())
            total += fraction * mean_gate
        expected.append(9 * total / 3)
    # Group 1: every token's top-1 is expert 0, mean gate 0.675 -> 9*0.675/3.
    np.testing.assert_allclose(expected[1], 3 * 0.675, rtol=1e-6)
    got = to_numpy(routing.gshard_loss(GATES))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_load_loss_hand_computed(k):
    noise_std = 0.5
    noisy = LOGITS + NOISE
    expected = []
    for g in range(2):
        probabilities = np.zeros(3)
        for s in range(4):
            threshold = sorted(noisy[g, s].tolist(), reverse=True)[k - 1]
            for e in range(3):
                z = (threshold - float(LOGITS[g, s, e])) / noise_std
                probabilities[e] += 0.5 * (1.0 - math.erf(z / math.sqrt(2.0))) / 4
        expected.append(_cv2(probabilities.tolist()))
    got = to_numpy(routing.load_loss(LOGITS, noisy, noise_std, k))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_z_loss_hand_computed():
    expected = []
    for g in range(2):
        values = [math.log(sum(math.exp(float(v)) for v in LOGITS[g, s])) ** 2 for s in range(4)]
        expected.append(sum(values) / 4)
    got = to_numpy(routing.z_loss(LOGITS))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_uniform_gates_have_zero_importance_loss():
    gates = np.full((1, 4, 4), 0.25, "float32")
    np.testing.assert_allclose(to_numpy(routing.importance_loss(gates)), [0.0], atol=1e-7)


def test_auxiliary_loss_is_weighted_sum():
    tokens = np.random.RandomState(2).randn(2, 8, 4).astype("float32")
    router = make_router(
        TokenChoiceRouter,
        4,
        num_experts=4,
        importance_loss_weight=0.1,
        gshard_loss_weight=0.2,
        z_loss_weight=0.3,
        load_loss_weight=0.4,
    )
    _, metrics = route(router, tokens)
    expected = 0.1 * metrics["importance_loss"] + 0.2 * metrics["gshard_loss"] + 0.3 * metrics["z_loss"]
    np.testing.assert_allclose(metrics["auxiliary_loss"], expected, rtol=1e-5)
    logits = tokens @ to_numpy(router.kernel)
    np.testing.assert_allclose(metrics["z_loss"], to_numpy(routing.z_loss(logits)), rtol=1e-5)
    gates = np_softmax(logits).astype("float32")
    np.testing.assert_allclose(
        metrics["importance_loss"], to_numpy(routing.importance_loss(gates)), rtol=1e-4
    )
    # Zero weights: nothing to add, a (G,) zero.
    router = make_router(
        TokenChoiceRouter, 4, num_experts=4, importance_loss_weight=0.0, load_loss_weight=0.0
    )
    _, metrics = route(router, tokens, training=True)
    np.testing.assert_array_equal(metrics["auxiliary_loss"], [0.0, 0.0])
    assert "z_loss" not in metrics


# --------------------------------------------------------------------------
# 6. renormalised combine weights


def test_renormalize_combine_weights():
    tokens = np.random.RandomState(4).randn(2, 8, 4).astype("float32")
    kwargs = dict(num_experts=4, num_selected_experts=2, capacity_factor=2.0)
    plain, _ = route(make_router(TokenChoiceRouter, 4, **kwargs), tokens)
    renorm, _ = route(make_router(TokenChoiceRouter, 4, renormalize_combine_weights=True, **kwargs), tokens)
    assert np.all(renorm.combine_index < 4 * renorm.dispatch_index.shape[-1])  # all kept
    np.testing.assert_array_equal(plain.combine_index, renorm.combine_index)
    np.testing.assert_allclose(renorm.combine_weights.sum(-1), 1.0, rtol=1e-5)
    assert np.all(plain.combine_weights.sum(-1) < 1.0 - 1e-3)
    np.testing.assert_allclose(
        renorm.combine_weights,
        plain.combine_weights / plain.combine_weights.sum(-1, keepdims=True),
        rtol=1e-5,
    )


def test_renormalize_with_drops_uses_top_k_sum():
    # A token whose 2nd choice is dropped keeps g1 / (g1 + g2), not 1.
    tokens = np.random.RandomState(5).randn(1, 8, 4).astype("float32")
    kwargs = dict(num_experts=4, num_selected_experts=2, capacity_factor=0.5, capacity_multiple_of=None)
    router = make_router(TokenChoiceRouter, 4, renormalize_combine_weights=True, **kwargs)
    plan, _, gates = route(router, tokens, with_gates=True)
    top = np.sort(gates, axis=-1)[..., ::-1][..., :2]
    expected = np.where(plan.combine_index < 4 * 2, top / top.sum(-1, keepdims=True), 0.0)
    assert np.any(plan.combine_index == 8)
    np.testing.assert_allclose(plan.combine_weights, expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# 7. expert choice


def test_expert_choice_capacity():
    assert ExpertChoiceRouter(num_experts=4).capacity(16) == 4
    assert ExpertChoiceRouter(num_experts=4).capacity(10) == 4  # ceil(2.5)=3 -> 4
    assert ExpertChoiceRouter(num_experts=4, capacity_factor=2.0).capacity(16) == 8
    router = ExpertChoiceRouter(num_experts=4, capacity_multiple_of=None)
    assert router.capacity(10) == 3
    router = ExpertChoiceRouter(num_experts=4, capacity_rounding="round", capacity_multiple_of=None)
    assert router.capacity(10) == 2


def test_expert_choice_capacity_above_group_size_raises():
    router = ExpertChoiceRouter(num_experts=2)  # S = 3: ceil(1.5) = 2 -> 4 > 3
    with pytest.raises(ValueError, match="group size"):
        router.capacity(3)
    router = make_router(ExpertChoiceRouter, 2, num_experts=2)
    with pytest.raises(ValueError, match="C=4"):
        router(np.zeros((1, 3, 2), "float32"))


@settings(max_examples=25, deadline=None)
@given(
    num_groups=GROUPS,
    group_size=GROUP_SIZES,
    num_experts=EXPERTS,
    capacity_factor=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    multiple_of=st.sampled_from([None, 4]),
    seed=SEEDS,
)
def test_expert_choice_plan(num_groups, group_size, num_experts, capacity_factor, multiple_of, seed):
    dim = 4
    capacity = expected_capacity(group_size, num_experts, capacity_factor, multiple_of)
    rng = np.random.RandomState(seed)
    tokens = rng.randn(num_groups, group_size, dim).astype("float32")
    kernel = rng.randn(dim, num_experts).astype("float32")
    router = make_router(
        ExpertChoiceRouter,
        dim,
        kernel=kernel,
        num_experts=num_experts,
        capacity_factor=capacity_factor,
        capacity_multiple_of=multiple_of,
    )
    if capacity > group_size:
        with pytest.raises(ValueError, match="group size"):
            router(tokens)
        return
    plan, metrics, gates_f32 = route(router, tokens, with_gates=True)
    G, S, E, C = num_groups, group_size, num_experts, capacity
    assert plan.dispatch_index.shape == (G, E, C)
    assert plan.combine_index.shape == (G, S, E)
    assert plan.combine_weights.shape == (G, S, E)

    gates = np_softmax(tokens.astype(np.float64) @ kernel.astype(np.float64))
    chosen = np.zeros((G, S, E), bool)
    for g in range(G):
        for e in range(E):
            # Each expert's row: its top-C tokens by gate, best first.
            column = gates_f32[g, :, e]
            best = np.argsort(-column, kind="stable")[:C]
            row = plan.dispatch_index[g, e]
            assert len(np.unique(row)) == C and row.min() >= 0 and row.max() < S
            np.testing.assert_array_equal(column[row], column[best])
            if len(np.unique(column)) == S:  # no ties (one expert: all gates 1)
                np.testing.assert_array_equal(row, best)
            chosen[g, row, e] = True
            for c, s in enumerate(row):
                assert plan.combine_index[g, s, e] == e * C + c
    np.testing.assert_array_equal(plan.combine_index[~chosen], E * C)
    np.testing.assert_allclose(plan.combine_weights, np.where(chosen, gates, 0.0), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(plan.combine_weights[~chosen], 0.0)
    np.testing.assert_allclose(metrics["dropped_tokens"], (~chosen.any(-1)).mean(-1), atol=1e-6)
    np.testing.assert_array_equal(metrics["auxiliary_loss"], np.zeros(G))
    np.testing.assert_allclose(metrics["experts_per_token_max"], chosen.sum(-1).max(-1))
    np.testing.assert_allclose(metrics["experts_per_token_min"], chosen.sum(-1).min(-1))


def test_expert_choice_dropped_tokens_metric():
    # Every token prefers expert 0 ever more; C = 2 of 8 per expert (E = 2):
    # experts 0 and 1 take the 2 best tokens each, 4 tokens go unchosen.
    logits = np.stack([np.arange(8.0), np.zeros(8)], axis=-1).astype("float32")[None]
    router = make_router(
        ExpertChoiceRouter,
        2,
        kernel=np.eye(2),
        num_experts=2,
        capacity_factor=0.5,
        capacity_multiple_of=None,
    )
    plan, metrics = route(router, logits)
    np.testing.assert_array_equal(plan.dispatch_index[0, 0], [7, 6])
    np.testing.assert_array_equal(plan.dispatch_index[0, 1], [0, 1])
    np.testing.assert_allclose(metrics["dropped_tokens"], [0.5])
    np.testing.assert_array_equal(metrics["experts_per_token_min"], [0.0])
    np.testing.assert_array_equal(metrics["experts_per_token_max"], [1.0])


# --------------------------------------------------------------------------
# 8. errors


def test_token_choice_k_above_e_raises():
    with pytest.raises(ValueError, match=r"num_selected_experts.*cannot exceed num_experts"):
        TokenChoiceRouter(num_experts=2, num_selected_experts=3)
    with pytest.raises(ValueError, match="num_selected_experts"):
        TokenChoiceRouter(num_experts=2, num_selected_experts=0)


@pytest.mark.parametrize("capacity_factor", [0.0, -1.0])
def test_nonpositive_capacity_factor_raises(capacity_factor):
    with pytest.raises(ValueError, match="capacity_factor"):
        TokenChoiceRouter(num_experts=2, capacity_factor=capacity_factor)
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(num_experts=2, capacity_factor=capacity_factor)


@pytest.mark.parametrize("cls", [TokenChoiceRouter, ExpertChoiceRouter])
def test_num_experts_below_one_raises(cls):
    with pytest.raises(ValueError, match="num_experts"):
        cls(num_experts=0)


def test_soft_router_errors():
    with pytest.raises(ValueError, match="num_experts"):
        SoftRouter(num_experts=0, slots_per_expert=1)
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftRouter(num_experts=2, slots_per_expert=0)


@pytest.mark.parametrize("cls", [TokenChoiceRouter, ExpertChoiceRouter])
def test_unknown_capacity_rounding_raises(cls):
    with pytest.raises(ValueError, match=r"capacity_rounding.*'ceil', 'round'"):
        cls(num_experts=2, capacity_rounding="floor")


def test_negative_noise_raises():
    with pytest.raises(ValueError, match="noise_std"):
        TokenChoiceRouter(num_experts=2, noise_std=-0.1)


# --------------------------------------------------------------------------
# 9. configs


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (
            TokenChoiceRouter,
            dict(
                num_experts=6,
                num_selected_experts=2,
                capacity_factor=1.5,
                batch_priority=True,
                noise_std=0.5,
                importance_loss_weight=0.01,
                load_loss_weight=0.02,
                gshard_loss_weight=0.03,
                z_loss_weight=0.04,
                capacity_rounding="round",
                capacity_multiple_of=None,
                renormalize_combine_weights=True,
                seed=7,
            ),
        ),
        (
            ExpertChoiceRouter,
            dict(
                num_experts=3,
                capacity_factor=2.0,
                noise_std=0.0,
                capacity_rounding="round",
                capacity_multiple_of=2,
                seed=1,
            ),
        ),
        (SoftRouter, dict(num_experts=5, slots_per_expert=3, noise_std=0.1, seed=2)),
    ],
)
def test_router_config_round_trip(cls, kwargs):
    router = cls(name="my_router", **kwargs)
    config = router.get_config()
    for name, value in kwargs.items():
        assert config[name] == value, name
    clone = cls.from_config(config)
    assert type(clone) is cls
    assert clone.get_config() == config
    assert clone.name == "my_router"
    assert clone.dtype_policy.name == "float32"
    # Also through Keras serialization (registered under keras_vmoe).
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(router))
    assert type(revived) is cls
    assert revived.get_config() == config


def test_router_stays_float32_under_mixed_policy():
    router = TokenChoiceRouter(num_experts=2, dtype="mixed_bfloat16")
    assert router.dtype_policy.name == "float32"
    router.build((None, None, 4))
    logits = router.gate_logits(ops.ones((1, 3, 4), dtype="bfloat16"))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


def test_batch_priority_ranks_by_raw_top1_gate_even_when_renormalising():
    # Token 0: top-1 gate 0.5 (renormalised 0.53); token 1: 0.45 (renormalised 0.6).
    # BPR must keep token 0, whose raw top-1 gate is larger.
    gates = np.array([[[0.5, 0.45, 0.05], [0.45, 0.3, 0.25]]], "float32")
    router = TokenChoiceRouter(
        3,
        num_selected_experts=2,
        capacity_factor=0.5,
        batch_priority=True,
        capacity_multiple_of=None,
        renormalize_combine_weights=True,
    )
    router.build((None, None, 3))
    router.kernel.assign(np.eye(3, dtype="float32"))
    plan, _ = router(np.log(gates), training=False)
    assert router.capacity(2) == 1
    combine_index = to_numpy(plan.combine_index)
    assert combine_index[0, 0, 0] == 0  # token 0's top-1 (expert 0, slot 0) kept
    assert combine_index[0, 1, 0] == 3  # token 1's top-1 dropped (E * C)
