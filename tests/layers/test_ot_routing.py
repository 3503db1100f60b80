"""The router study's routers: Sinkhorn and sparsity-constrained OT, and the sparse top-k.

Plans against NumPy float64 references of vmoe's solvers (`ot_references`),
invariants on random inputs (hypothesis) for every sparse router: capacity,
padding, slot tables that agree with each other; marginals of the plans; the
sparse top-k against the authors' PAV route, its limits and its gradient.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_vmoe.layers import ROUTERS
from keras_vmoe.layers import SinkhornExpertChoiceRouter
from keras_vmoe.layers import SinkhornTokenChoiceRouter
from keras_vmoe.layers import SparseExpertChoiceRouter
from keras_vmoe.layers import SparseMoE
from keras_vmoe.layers import SparseTokenChoiceRouter
from keras_vmoe.layers import SparseTopKRouter
from keras_vmoe.layers import sparse_top_k_mask
from keras_vmoe.layers.optimal_transport import semi_dual_plan
from keras_vmoe.layers.optimal_transport import sinkhorn_plan
from tests.helpers import backend
from tests.helpers import to_numpy
from tests.layers import ot_references as ref
from tests.layers.test_routing import reference_token_choice

SPARSE_ROUTERS = sorted(ROUTERS)
TOKEN_CHOICE = {"token_choice", "sinkhorn_token_choice", "sparse_token_choice", "sparse_top_k"}
_JITTED = {}


def build(name, dim=6, num_experts=4, seed=0, scale=3.0, **options):
    """A router of `name` from the registry with a random kernel (`scale` makes
    the gates peaky, as a trained router's; nearly uniform gates make the
    semi-dual ill-conditioned, see the fixture README)."""
    cls = ROUTERS[name]
    if name in TOKEN_CHOICE:
        options.setdefault("num_selected_experts", 2)
    router = cls(num_experts, noise_std=0.0, **options)
    router.build((None, None, dim))
    kernel = scale * np.random.RandomState(seed).randn(dim, num_experts)
    router.kernel.assign(kernel.astype("float32"))
    return router


def call(router, tokens, token_mask=None, compiled=True):
    """(plan, metrics) as numpy; JAX compiles once per router config and shape
    (eagerly with `compiled=False`)."""

    def run(trainable, non_trainable, x, mask, _router=router):
        return _router.stateless_call(trainable, non_trainable, x, training=False, token_mask=mask)[0]

    if backend() == "jax" and compiled:
        import jax

        key = (type(router), repr(sorted(router.get_config().items())), tokens.shape, token_mask is None)
        if key not in _JITTED:
            _JITTED[key] = jax.jit(run)
        plan, metrics = _JITTED[key](
            [v.value for v in router.trainable_variables],
            [v.value for v in router.non_trainable_variables],
            tokens,
            token_mask,
        )
    else:
        plan, metrics = router(tokens, training=False, token_mask=token_mask)
    return type(plan)(*[to_numpy(t) for t in plan]), {k: to_numpy(v) for k, v in metrics.items()}


def scores_of(router, tokens, token_mask=None):
    """What the router chose its pairs by (the plan) and its combine gates, numpy."""
    scores, combine, _ = router.route_gates(tokens, False, token_mask)
    return to_numpy(scores).astype(np.float64), to_numpy(combine).astype(np.float64)


def check_plan(plan, capacity, token_mask=None):
    """The two tables of a sparse plan agree, no expert holds more than
    `capacity` tokens, and padding takes no slot and gets no weight."""
    num_groups, num_experts, slots = plan.dispatch_index.shape
    _, group_size, _ = plan.combine_index.shape
    assert slots == capacity
    dropped = num_experts * capacity
    for g in range(num_groups):
        kept = plan.combine_index[g] < dropped
        flat = plan.dispatch_index[g].ravel()
        assert np.all((flat >= 0) & (flat <= group_size))
        # Every kept choice's slot holds that token; every filled slot is some kept choice.
        tokens = np.nonzero(kept)[0]
        slots = plan.combine_index[g][kept]
        np.testing.assert_array_equal(flat[slots], tokens)
        assert len(np.unique(slots)) == len(slots) == int(np.sum(flat < group_size))
        assert np.all(plan.combine_weights[g][~kept] == 0)
        assert np.all(plan.combine_weights[g][kept] >= 0)
        if token_mask is not None:
            padding = ~np.asarray(token_mask[g], bool)
            assert not np.any(kept[padding])
            assert not np.any(np.isin(flat, np.nonzero(padding)[0]))


# --------------------------------------------------------------------------
# solvers against NumPy


@pytest.mark.parametrize("iterations", [0, 1, 10, 20, 35])
def test_sinkhorn_plan_matches_numpy(iterations):
    rng = np.random.RandomState(iterations)
    logits = 3 * rng.randn(3, 17, 4)
    mask = rng.rand(3, 17) > 0.2
    for token_mask in (None, mask):
        expected = ref.sinkhorn(logits, iterations, token_mask)
        got = to_numpy(sinkhorn_plan(logits.astype("float32"), iterations, token_mask))
        # float32 exp and products of ~20 iterations: a few ulps of values up to ~10.
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


@settings(max_examples=4 if backend() == "jax" else 10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_sinkhorn_plan_marginals(seed):
    rng = np.random.RandomState(seed)
    logits = 3 * rng.randn(2, 32, 8)
    mask = np.ones((2, 32), bool)
    mask[1, 24:] = False  # A group with 8 padding tokens.
    for iterations, column_tolerance in ((20, None), (300, 1e-4)):
        plan = to_numpy(sinkhorn_plan(logits.astype("float32"), iterations, mask)).astype(np.float64)
        rows = plan.sum(axis=2)
        # The last update is u: every real token's row sums to 1; padding's to 0.
        # exp of arguments up to ~20 (log u + log v + logits): a few ulps each,
        # exp implemented differently by XLA, Eigen, Sleef and per CPU.
        np.testing.assert_allclose(rows[mask], 1.0, rtol=1e-5)
        np.testing.assert_array_equal(rows[~mask], 0.0)
        columns = plan.sum(axis=1) / (mask.sum(axis=1, keepdims=True) / 8)
        if column_tolerance is not None:  # Converged: every expert holds (real tokens) / E.
            np.testing.assert_allclose(columns, 1.0, atol=column_tolerance)


@pytest.mark.parametrize("k", [None, 1, 5, 12])
def test_simplex_projection_and_semi_dual_match_numpy(k):
    rng = np.random.RandomState(0 if k is None else k)
    gates = ref.np_softmax(3 * rng.randn(2, 24, 4))
    mask = np.ones((2, 24), bool)
    mask[0, 20:] = False
    for token_mask in (None, mask):
        # Expert choice: columns are the experts, k per column.
        expected = ref.sparse_expert_choice_plan(gates, k, token_mask)
        router = SparseExpertChoiceRouter(4, projection="dense" if k is None else "k_sparse")
        similarity = np.transpose(gates, (0, 2, 1))
        if token_mask is not None:
            similarity = np.where(token_mask[:, None, :], similarity, -1e9)
        token_mass = np.ones((2, 24)) if token_mask is None else token_mask.astype("float64")
        expert_mass = np.repeat(token_mass.sum(1, keepdims=True) / 4, 4, axis=1)
        got = to_numpy(
            semi_dual_plan(
                similarity.astype("float32"), token_mass.astype("float32"), expert_mass.astype("float32"), k
            )
        )
        # Adam's sign-like steps carry float32 rounding of the gradient; 20
        # steps of lr 0.01 keep the plans within 1e-6 (measured 1.7e-7).
        np.testing.assert_allclose(np.transpose(got, (0, 2, 1)), expected, atol=2e-5)
        assert router.projection in ("dense", "k_sparse")
    if k is not None and k <= 4:  # Token choice: columns are the tokens, k per token.
        expected = ref.sparse_token_choice_plan(gates, k)
        got = to_numpy(
            semi_dual_plan(
                gates.astype("float32"), np.full((2, 4), 6.0, "float32"), np.ones((2, 24), "float32"), k
            )
        )
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_semi_dual_stops_when_the_gradient_is_small():
    # Perfectly balanced gates: the first step's gradient is (near) zero, and
    # jaxopt stops after that one step; the plan then is the first projection.
    gates = np.tile(np.eye(4), (1, 2, 1)).astype("float32") * 0.5 + 0.125  # (1, 8, 4)
    expected, steps = ref.semi_dual(np.transpose(gates[0]), np.ones(8), np.full(4, 2.0), 2)
    assert steps == 1
    got = to_numpy(
        semi_dual_plan(
            np.transpose(gates, (0, 2, 1)), np.ones((1, 8), "float32"), np.full((1, 4), 2.0, "float32"), 2
        )
    )
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


# --------------------------------------------------------------------------
# routers: plans and invariants


@settings(max_examples=6 if backend() == "jax" else 12, deadline=None)
@given(
    name=st.sampled_from(SPARSE_ROUTERS),
    group_size=st.sampled_from([8, 13]),
    capacity_factor=st.sampled_from([0.5, 1.0, 2.0]),
    padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_router_keeps_capacity_and_padding(name, group_size, capacity_factor, padding, seed):
    rng = np.random.RandomState(seed)
    router = build(name, seed=seed, capacity_factor=capacity_factor)
    tokens = rng.randn(2, group_size, 6).astype("float32")
    token_mask = None
    if padding:
        token_mask = rng.rand(2, group_size) > 0.3
        token_mask[:, 0] = True
    # The semi-dual routers' Adam steps can turn last-bit differences between
    # a compiled and an eager run into visible ones: their plan is checked
    # against scores from the same (eager) computation.
    semi_dual = name in ("sparse_token_choice", "sparse_expert_choice")
    plan, metrics = call(router, tokens, token_mask, compiled=not semi_dual)
    capacity = router.capacity(group_size)
    check_plan(plan, capacity, token_mask)
    for value in metrics.values():
        assert value.shape == (2,)
    assert np.all(np.isfinite(metrics["auxiliary_loss"]))
    # The plan is the dispatcher run on the router's scores.
    scores, combine = scores_of(router, tokens, token_mask)
    if name in TOKEN_CHOICE:
        if padding:
            return  # The numpy dispatcher has no padding; the invariants above hold.
        top, combine_index, dispatch_index = reference_token_choice(scores, 2, capacity, False)
        near_tie = np.any(np.abs(np.diff(np.sort(scores, -1)[..., -3:], axis=-1)) < 1e-5)
        if not near_tie:
            np.testing.assert_array_equal(plan.combine_index, combine_index)
            np.testing.assert_array_equal(plan.dispatch_index, dispatch_index)
            weights = np.take_along_axis(combine, top, axis=-1)
            expected = np.where(combine_index < 4 * capacity, weights, 0)
            np.testing.assert_allclose(plan.combine_weights, expected, rtol=1e-5, atol=1e-7)
    else:
        if padding:
            scores = np.where(token_mask[..., None], scores, -np.inf)
        for g in range(2):
            for e in range(4):
                column = scores[g, :, e]
                chosen = plan.dispatch_index[g, e][plan.dispatch_index[g, e] < group_size]
                # Each expert took tokens with the largest scores.
                rejected = np.setdiff1d(np.nonzero(np.isfinite(column))[0], chosen)
                if len(chosen) and len(rejected):
                    assert column[chosen].min() >= column[rejected].max() - 1e-6


@pytest.mark.parametrize("name", ["sinkhorn_token_choice", "sinkhorn_expert_choice"])
def test_sinkhorn_routers_choose_by_the_plan_and_combine_with_softmax(name):
    rng = np.random.RandomState(3)
    router = build(name, seed=3)
    tokens = rng.randn(2, 16, 6).astype("float32")
    scores, combine = scores_of(router, tokens)
    logits = tokens.astype(np.float64) @ to_numpy(router.kernel).astype(np.float64)
    np.testing.assert_allclose(scores, ref.sinkhorn(logits, 20), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(combine, ref.np_softmax(logits), rtol=1e-5, atol=1e-7)
    # combine_weights="plan": the plan values instead.
    _, combine = scores_of(build(name, seed=3, combine_weights="plan"), tokens)
    np.testing.assert_allclose(combine, scores, rtol=1e-6)


def test_sinkhorn_token_choice_in_training_takes_the_plan_from_noisy_logits():
    router = SinkhornTokenChoiceRouter(4, num_selected_experts=1, noise_std=4.0, seed=1)
    router.build((None, None, 6))
    tokens = np.random.RandomState(0).randn(1, 16, 6).astype("float32")
    clean_scores, clean_combine, _ = router.route_gates(tokens, False, None)
    noisy_scores, noisy_combine, metrics = router.route_gates(tokens, True, None)
    assert not np.allclose(to_numpy(noisy_scores), to_numpy(clean_scores), atol=1e-3)
    # vmoe's mix-up, kept: the combine weights stay the clean softmax.
    np.testing.assert_allclose(to_numpy(noisy_combine), to_numpy(clean_combine), rtol=1e-6)
    assert "load_loss" in metrics


@settings(max_examples=3 if backend() == "jax" else 8, deadline=None)
@given(seed=st.integers(0, 2**16), capacity_factor=st.sampled_from([0.5, 1.0]))
def test_sparse_plans_are_sparse_and_meet_their_marginals(seed, capacity_factor):
    rng = np.random.RandomState(seed)
    tokens = rng.randn(2, 24, 6).astype("float32")
    # Expert choice: at most C non-zeros per expert, columns sum to S / E.
    router = build("sparse_expert_choice", seed=seed, capacity_factor=capacity_factor)
    capacity = router.capacity(24)
    plan, _ = scores_of(router, tokens)
    assert ((plan > 0).sum(axis=1) <= capacity).all()
    np.testing.assert_allclose(plan.sum(axis=1), 24 / 4, rtol=1e-5)
    _, metrics = call(router, tokens, compiled=False)  # Counted on the same computation.
    np.testing.assert_array_equal(metrics["plan_nonzeros_per_expert_max"], (plan > 0).sum(axis=1).max(axis=1))
    # The dense projection: the same columns, no sparsity bound.
    dense, _ = scores_of(build("sparse_expert_choice", seed=seed, projection="dense"), tokens)
    np.testing.assert_allclose(dense.sum(axis=1), 24 / 4, rtol=1e-5)
    # Token choice: at most K non-zeros per token, rows sum to 1.
    router = build("sparse_token_choice", seed=seed, num_selected_experts=2)
    plan, _ = scores_of(router, tokens)
    assert ((plan > 0).sum(axis=2) <= 2).all()
    np.testing.assert_allclose(plan.sum(axis=2), 1.0, rtol=1e-5)
    _, metrics = call(router, tokens, compiled=False)
    np.testing.assert_allclose(metrics["plan_nonzeros_per_token_avg"], (plan > 0).sum(axis=2).mean(axis=1))


# --------------------------------------------------------------------------
# the sparse top-k


def test_sparse_top_k_matches_the_isotonic_route():
    rng = np.random.RandomState(0)
    for _ in range(40):
        n = rng.randint(2, 12)
        k = rng.randint(1, n + 1)
        regularization = float(10 ** rng.uniform(-2, 1))
        x = rng.randn(n) * rng.choice([0.1, 1.0, 5.0])
        expected = ref.pav_top_k_mask(x, k, regularization)
        got = to_numpy(sparse_top_k_mask(x[None].astype("float32"), k, regularization))[0]
        # float32 inputs and threshold: errors of a few ulps of x / l.
        np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(x).max() / regularization))


def test_sparse_top_k_properties():
    rng = np.random.RandomState(1)
    x = rng.randn(64, 8).astype("float32")
    for k in (1, 2, 5):
        for regularization in (1e-3, 0.1, 1.0, 100.0):
            y = to_numpy(sparse_top_k_mask(x, k, regularization)).astype(np.float64)
            assert np.all((y >= 0) & (y <= 1))
            # y = (x - tau) / l in float32: each entry is off by a few ulps of
            # |x| / l (x - tau cancels); summed over the 8 entries.
            tolerance = 8 * 4 * np.finfo(np.float32).eps * max(1.0, np.abs(x).max() / regularization)
            np.testing.assert_allclose(y.sum(-1), k, atol=tolerance)
            assert np.all((y == 1).sum(-1) <= k)
            # Order kept: a larger input never gets a smaller output.
            order = np.argsort(x, axis=-1)
            assert np.all(np.diff(np.take_along_axis(y, order, -1), axis=-1) >= -1e-6)
            # Hard top-k wherever the k-th and (k+1)-th inputs are >= l apart.
            s = -np.sort(-x, axis=-1)
            gap = s[:, k - 1] - (s[:, k] if k < 8 else -np.inf)
            hard = (x >= s[:, k - 1 : k]).astype(np.float64)
            np.testing.assert_allclose(y[gap >= regularization], hard[gap >= regularization], atol=tolerance)
            if regularization == 100.0:  # Strong: no entry clips, y = k/n + (x - mean x)/l -> k/n.
                expected = k / 8 + (x - x.mean(-1, keepdims=True)) / regularization
                np.testing.assert_allclose(y, expected, atol=1e-5)
    # At most k non-zeros once the gap exceeds l; more inside a pooled block.
    y = to_numpy(sparse_top_k_mask(np.array([[3.0, 1.0, 0.5, -1.0]], "float32"), 2, 0.6))[0]
    np.testing.assert_allclose(y, [1.0, 11 / 12, 1 / 12, 0.0], atol=1e-5)


def test_sparse_top_k_gradient_matches_finite_differences():
    rng = np.random.RandomState(2)
    x = rng.randn(3, 6)
    cotangent = rng.randn(3, 6)
    for p in (2.0, 4.0 / 3.0):

        def value(v):
            return float(np.sum(to_numpy(sparse_top_k_mask(v.astype("float32"), 2, 0.8, p)) * cotangent))

        weights = ops.convert_to_tensor(cotangent.astype("float32"))
        grad = _gradient(lambda v: ops.sum(sparse_top_k_mask(v, 2, 0.8, p) * weights), x.astype("float32"))
        numeric = np.zeros_like(x)
        step = 1e-2  # float32 forward values: a step well above their rounding.
        for index in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[index] += step
            down[index] -= step
            numeric[index] = (value(up) - value(down)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, atol=2e-3)


def _gradient(function, x):
    if backend() == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: function(v))(x))
    if backend() == "tensorflow":
        import tensorflow as tf

        v = tf.Variable(x)
        with tf.GradientTape() as tape:
            out = function(v)
        return tape.gradient(out, v).numpy()
    import torch

    v = torch.tensor(x, requires_grad=True)
    function(v).backward()
    return v.grad.numpy()


def test_sparse_top_k_router_gates():
    rng = np.random.RandomState(4)
    router = build("sparse_top_k", seed=4, num_selected_experts=2, regularization=0.5)
    tokens = rng.randn(2, 16, 6).astype("float32")
    scores, combine = scores_of(router, tokens)
    logits = tokens.astype(np.float64) @ to_numpy(router.kernel).astype(np.float64)
    mask = np.stack([[ref.pav_top_k_mask(row, 2, 0.5) for row in group] for group in logits])
    np.testing.assert_allclose(combine, mask * ref.np_softmax(logits), rtol=1e-4, atol=1e-6)
    plan, _ = call(router, tokens)
    assert ((plan.combine_weights > 0).sum(-1) <= 2).all()  # At most K non-zeros.
    # Far from ties, the gates are V-MoE's: the softmax of the top 2.
    tiny = build("sparse_top_k", seed=4, num_selected_experts=2, regularization=1e-4)
    vmoe = build("token_choice", seed=4, num_selected_experts=2)
    a, b = call(tiny, tokens)[0], call(vmoe, tokens)[0]
    np.testing.assert_array_equal(a.combine_index, b.combine_index)
    np.testing.assert_allclose(a.combine_weights, b.combine_weights, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# configs and errors


@pytest.mark.parametrize(
    "cls, options",
    [
        (SinkhornTokenChoiceRouter, dict(num_iterations=30, combine_weights="plan", num_selected_experts=2)),
        (SinkhornExpertChoiceRouter, dict(num_iterations=10, capacity_factor=2.0)),
        (SparseTokenChoiceRouter, dict(max_steps=7, learning_rate=0.05, tolerance=1e-4)),
        (SparseExpertChoiceRouter, dict(projection="dense", max_steps=9)),
        (SparseTopKRouter, dict(regularization=0.3, p=1.5, num_selected_experts=2)),
    ],
)
def test_config_round_trip(cls, options):
    router = cls(4, **options)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(router))
    assert type(clone) is cls and clone.get_config() == router.get_config()
    for key, value in options.items():
        assert getattr(clone, key) == value


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"unknown router 'sinkhorn'.*sinkhorn_expert_choice.*sparse_top_k"):
        SparseMoE(4, 8, router="sinkhorn")
    with pytest.raises(ValueError, match=r"does not take \['maxiter'\].*num_iterations"):
        SparseMoE(4, 8, router="sinkhorn_token_choice", router_options={"maxiter": 20})
    with pytest.raises(ValueError, match="num_selected_experts.*cannot exceed num_experts"):
        SparseTopKRouter(4, num_selected_experts=5)
    with pytest.raises(ValueError, match="C=12 tokens from groups of 8"):
        build("sparse_expert_choice", capacity_factor=5.0).capacity(8)
    with pytest.raises(ValueError, match="projection"):
        SparseExpertChoiceRouter(4, projection="sparse")
    with pytest.raises(ValueError, match="regularization"):
        SparseTopKRouter(4, regularization=0.0)
    with pytest.raises(ValueError, match="gshard_loss_weight.*not a loss of this router"):
        SinkhornTokenChoiceRouter(4, gshard_loss_weight=0.1)
    tokens = np.ones((1, 8, 6), "float32")
    tokens[0, 3, 2] = np.nan
    for name in ("token_choice", "sinkhorn_expert_choice", "sparse_top_k"):
        with pytest.raises(ValueError, match="NaN or infinite"):
            build(name)(tokens)
