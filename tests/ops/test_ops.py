"""MoE ops: the generic reference against numpy, and every backend override against the reference."""

import keras
import numpy as np
import pytest

import keras_vmoe.ops as moe_ops
from keras_vmoe.layers.routing import TokenChoiceRouter
from keras_vmoe.ops import generic
from tests.helpers import backend
from tests.helpers import to_numpy

G, S, D, E, K, H = 3, 16, 8, 4, 2, 12


def routing_plan(capacity_factor, seed=0):
    """A real token-choice plan: capacity 0.5 drops choices, 2.0 leaves slots empty."""
    router = TokenChoiceRouter(
        num_experts=E,
        num_selected_experts=K,
        capacity_factor=capacity_factor,
        capacity_multiple_of=None,
        seed=seed,
    )
    tokens = np.random.RandomState(seed).randn(G, S, D).astype("float32")
    plan, _ = router(tokens, training=False)
    return tuple(to_numpy(x) for x in plan)


def numpy_dispatch(tokens, dispatch_index):
    num_groups, _, dim = tokens.shape
    _, num_experts, capacity = dispatch_index.shape
    out = np.zeros((num_experts, num_groups, capacity, dim), tokens.dtype)
    for g, e, c in np.ndindex(dispatch_index.shape):
        if dispatch_index[g, e, c] < tokens.shape[1]:
            out[e, g, c] = tokens[g, dispatch_index[g, e, c]]
    return out.reshape(num_experts, -1, dim)


def numpy_combine(expert_outputs, combine_index, combine_weights):
    num_experts, _, dim = expert_outputs.shape
    num_groups = combine_index.shape[0]
    slots = expert_outputs.reshape(num_experts, num_groups, -1, dim)
    capacity = slots.shape[2]
    out = np.zeros(combine_index.shape[:2] + (dim,), expert_outputs.dtype)
    for g, s, k in np.ndindex(combine_index.shape):
        slot = combine_index[g, s, k]
        if slot < num_experts * capacity:
            out[g, s] += combine_weights[g, s, k] * slots[slot // capacity, g, slot % capacity]
    return out


def gradients(fn, args):
    """d sum(fn(*args) * cotangent) / d args, with the backend's own autodiff."""
    cotangent = np.random.RandomState(7).randn(*keras.ops.shape(fn(*args))).astype("float32")
    name = backend()
    if name == "jax":
        import jax

        return jax.grad(lambda *a: (fn(*a) * cotangent).sum(), argnums=tuple(range(len(args))))(*args)
    if name == "tensorflow":
        import tensorflow as tf

        variables = [tf.Variable(a) for a in args]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(fn(*variables) * cotangent)
        return tape.gradient(loss, variables)
    import torch

    tensors = [torch.tensor(a, requires_grad=True) for a in args]
    (fn(*tensors) * torch.tensor(cotangent)).sum().backward()
    return [t.grad for t in tensors]


def assert_close(got, expected, rtol=1e-5):
    got, expected = to_numpy(got), to_numpy(expected)
    scale = max(1.0, np.abs(expected).max())
    assert np.abs(got - expected).max() <= rtol * scale


@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
def test_dispatch_and_combine_match_numpy_and_the_override(capacity_factor):
    dispatch_index, combine_index, combine_weights = routing_plan(capacity_factor)
    rng = np.random.RandomState(1)
    tokens = rng.randn(G, S, D).astype("float32")
    expert_outputs = rng.randn(E, G * dispatch_index.shape[-1], D).astype("float32")
    expected = numpy_dispatch(tokens, dispatch_index)
    assert_close(generic.dispatch(tokens, dispatch_index), expected, 1e-6)
    assert_close(moe_ops.dispatch(tokens, dispatch_index), expected, 1e-6)
    expected = numpy_combine(expert_outputs, combine_index, combine_weights)
    assert_close(generic.combine(expert_outputs, combine_index, combine_weights), expected)
    assert_close(moe_ops.combine(expert_outputs, combine_index, combine_weights), expected)


@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
def test_override_gradients_equal_the_reference(capacity_factor):
    dispatch_index, combine_index, combine_weights = routing_plan(capacity_factor, seed=3)
    rng = np.random.RandomState(2)
    tokens = rng.randn(G, S, D).astype("float32")
    expert_outputs = rng.randn(E, G * dispatch_index.shape[-1], D).astype("float32")
    for op_name, args, fixed in (
        ("dispatch", (tokens,), (dispatch_index,)),
        ("combine", (expert_outputs, combine_weights), (combine_index,)),
    ):

        def call(module, *a, op_name=op_name, fixed=fixed):
            if op_name == "dispatch":
                return getattr(module, op_name)(a[0], *fixed)
            return getattr(module, op_name)(a[0], fixed[0], a[1])

        expected = gradients(lambda *a: call(generic, *a), args)
        got = gradients(lambda *a: call(moe_ops, *a), args)
        for g, e in zip(got, expected):
            assert_close(g, e)


def test_expert_dense_matches_numpy_with_gradients():
    rng = np.random.RandomState(4)
    inputs = rng.randn(E, 10, D).astype("float32")
    kernel = rng.randn(E, D, H).astype("float32")
    bias = rng.randn(E, H).astype("float32")
    expected = np.einsum("end,edh->enh", inputs, kernel) + bias[:, None]
    assert_close(generic.expert_dense(inputs, kernel, bias), expected)
    assert_close(moe_ops.expert_dense(inputs, kernel, bias), expected)
    assert_close(moe_ops.expert_dense(inputs, kernel), expected - bias[:, None])
    for g, e in zip(
        gradients(moe_ops.expert_dense, (inputs, kernel, bias)),
        gradients(generic.expert_dense, (inputs, kernel, bias)),
    ):
        assert_close(g, e)


def test_soft_dispatch_and_combine_match_numpy_with_gradients():
    rng = np.random.RandomState(5)
    tokens = rng.randn(G, S, D).astype("float32")
    logits = rng.randn(G, S, E, 2).astype("float32")
    dispatch_weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    combine_weights = np.exp(logits) / np.exp(logits).sum(axis=(2, 3), keepdims=True)
    expert_outputs = rng.randn(E, G * 2, D).astype("float32")
    expected = np.einsum("gsep,gsd->egpd", dispatch_weights, tokens).reshape(E, G * 2, D)
    assert_close(generic.soft_dispatch(tokens, dispatch_weights), expected)
    assert_close(moe_ops.soft_dispatch(tokens, dispatch_weights), expected)
    expected = np.einsum("gsep,egpd->gsd", combine_weights, expert_outputs.reshape(E, G, 2, D))
    assert_close(generic.soft_combine(expert_outputs, combine_weights), expected)
    assert_close(moe_ops.soft_combine(expert_outputs, combine_weights), expected)
    for module_args in (
        ("soft_dispatch", (tokens, dispatch_weights)),
        ("soft_combine", (expert_outputs, combine_weights)),
    ):
        name, args = module_args
        for g, e in zip(gradients(getattr(moe_ops, name), args), gradients(getattr(generic, name), args)):
            assert_close(g, e)


def test_generic_ops_can_be_forced(monkeypatch):
    monkeypatch.setenv("KERAS_VMOE_GENERIC_OPS", "1")
    assert moe_ops._backend_overrides() == {}


@pytest.mark.skipif(backend() != "tensorflow", reason="TensorFlow's XLA path")
def test_tensorflow_combine_under_xla_equals_the_reference():
    import tensorflow as tf

    dispatch_index, combine_index, combine_weights = routing_plan(0.5)
    expert_outputs = np.random.RandomState(1).randn(E, G * dispatch_index.shape[-1], D).astype("float32")
    expected = generic.combine(expert_outputs, combine_index, combine_weights)
    compiled = tf.function(moe_ops.combine, jit_compile=True)
    assert_close(compiled(expert_outputs, combine_index, combine_weights), expected)


def expert_mlp(kernel):
    """experts(inputs) as `sparse_moe` takes it: tanh(x W_e) per expert."""

    def experts(inputs):
        if isinstance(inputs, moe_ops.GroupedRows):
            return keras.ops.tanh(moe_ops.grouped_dense(inputs.rows, kernel, inputs.group_sizes))
        if isinstance(inputs, list):
            kernels = keras.ops.unstack(keras.ops.convert_to_tensor(kernel))
            return [keras.ops.tanh(keras.ops.matmul(x, k)) for x, k in zip(inputs, kernels)]
        return keras.ops.tanh(keras.ops.matmul(inputs, kernel))

    return experts


@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
@pytest.mark.parametrize("padded_slots", [None, 0])
def test_sparse_moe_override_equals_the_padded_reference_with_gradients(
    capacity_factor, padded_slots, monkeypatch
):
    """`padded_slots=0`: the per-expert path, which the PyTorch and
    TensorFlow-graph overrides take above `PADDED_SLOTS` capacity slots
    (these plans have fewer)."""
    import importlib

    from keras_vmoe.layers.routing import RoutingPlan

    if padded_slots is not None:
        if backend() == "jax":
            pytest.skip("JAX has no sparse_moe override")
        module = importlib.import_module(f"keras_vmoe.ops.{backend()}")
        monkeypatch.setattr(module, "PADDED_SLOTS", padded_slots)

    dispatch_index, combine_index, combine_weights = routing_plan(capacity_factor, seed=5)
    rng = np.random.RandomState(6)
    tokens = rng.randn(G, S, D).astype("float32")
    kernel = rng.randn(E, D, D).astype("float32") / np.sqrt(D)

    def run(module, tokens, weights, kernel):
        plan = RoutingPlan(dispatch_index, combine_index, weights)
        return module.sparse_moe(tokens, plan, expert_mlp(kernel))

    args = (tokens, combine_weights, kernel)
    assert_close(run(moe_ops, *args), run(generic, *args))
    expected = gradients(lambda *a: run(generic, *a), args)
    for got, want in zip(gradients(lambda *a: run(moe_ops, *a), args), expected):
        assert_close(got, want)
    if backend() == "tensorflow":  # Keras' default on GPUs: the XLA branch.
        import tensorflow as tf

        compiled = tf.function(lambda *a: run(moe_ops, *a), jit_compile=True)
        assert_close(compiled(*args), run(generic, *args))


@pytest.mark.parametrize("padded_slots", [None, 0])
def test_soft_moe_override_equals_the_reference_with_gradients(padded_slots, monkeypatch):
    """`padded_slots=0`: TensorFlow's one matmul per expert, which it takes
    above `PADDED_SLOTS` slots (these weights have fewer)."""
    if padded_slots is not None:
        if backend() != "tensorflow":
            pytest.skip("only TensorFlow's soft_moe switches paths by size")
        from keras_vmoe.ops import tensorflow as tensorflow_ops

        monkeypatch.setattr(tensorflow_ops, "PADDED_SLOTS", padded_slots)
    rng = np.random.RandomState(8)
    tokens = rng.randn(G, S, D).astype("float32")
    logits = rng.randn(G, S, E, 2).astype("float32")
    dispatch_weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    combine_weights = np.exp(logits) / np.exp(logits).sum(axis=(2, 3), keepdims=True)
    kernel = rng.randn(E, D, D).astype("float32") / np.sqrt(D)

    def run(module, tokens, dispatch_weights, combine_weights, kernel):
        return module.soft_moe(tokens, dispatch_weights, combine_weights, expert_mlp(kernel))

    args = (tokens, dispatch_weights, combine_weights, kernel)
    assert_close(run(moe_ops, *args), run(generic, *args))
    expected = gradients(lambda *a: run(generic, *a), args)
    for got, want in zip(gradients(lambda *a: run(moe_ops, *a), args), expected):
        assert_close(got, want)
    if backend() == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(lambda *a: run(moe_ops, *a), jit_compile=True)
        assert_close(compiled(*args), run(generic, *args))


def test_grouped_dense_matches_numpy_with_gradients():
    rng = np.random.RandomState(9)
    group_sizes = np.array([3, 0, 5, 2], "int32")  # An expert with no rows too.
    rows = rng.randn(int(group_sizes.sum()), D).astype("float32")
    kernel = rng.randn(E, D, H).astype("float32")
    bias = rng.randn(E, H).astype("float32")
    experts = np.repeat(np.arange(E), group_sizes)
    expected = np.einsum("md,mdh->mh", rows, kernel[experts]) + bias[experts]
    for module in (moe_ops, generic):
        assert_close(module.grouped_dense(rows, kernel, group_sizes, bias), expected)
    args = (rows, kernel, bias)
    want = gradients(lambda *a: generic.grouped_dense(a[0], a[1], group_sizes, a[2]), args)
    got = gradients(lambda *a: moe_ops.grouped_dense(a[0], a[1], group_sizes, a[2]), args)
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
def test_grouped_sparse_moe_equals_the_padded_reference_with_gradients(capacity_factor):
    from keras_vmoe.layers.routing import RoutingPlan

    dispatch_index, combine_index, combine_weights = routing_plan(capacity_factor, seed=11)
    rng = np.random.RandomState(12)
    tokens = rng.randn(G, S, D).astype("float32")
    kernel = rng.randn(E, D, D).astype("float32") / np.sqrt(D)

    def run(grouped, tokens, weights, kernel):
        plan = RoutingPlan(dispatch_index, combine_index, weights)
        if not grouped:
            return generic.sparse_moe(tokens, plan, expert_mlp(kernel))
        with moe_ops.grouped_gemm(True):
            assert moe_ops.uses_grouped_gemm(tokens, plan)
            return moe_ops.sparse_moe(tokens, plan, expert_mlp(kernel))

    args = (tokens, combine_weights, kernel)
    assert_close(run(True, *args), run(False, *args))
    expected = gradients(lambda *a: run(False, *a), args)
    for got, want in zip(gradients(lambda *a: run(True, *a), args), expected):
        assert_close(got, want)
    if backend() == "jax":  # Static shapes: it compiles.
        import jax

        assert_close(jax.jit(lambda *a: run(True, *a))(*args), run(False, *args))
    if backend() == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(lambda *a: run(True, *a), jit_compile=True)
        assert_close(compiled(*args), run(False, *args))


def test_grouped_plan_sorts_the_kept_choices_by_expert():
    from keras_vmoe.layers.routing import RoutingPlan

    for capacity_factor in (0.5, 2.0):
        dispatch_index, combine_index, weights = routing_plan(capacity_factor, seed=13)
        plan = RoutingPlan(dispatch_index, combine_index, weights)
        token_rows, group_sizes, choice_rows, kept = (to_numpy(x) for x in generic.grouped_plan(plan))
        capacity = dispatch_index.shape[-1]
        choices = combine_index.reshape(-1)
        np.testing.assert_array_equal(kept, choices < E * capacity)
        num_rows = min(G * S * K, E * G * capacity)  # Never more rows than the padded slots.
        assert len(token_rows) == num_rows and group_sizes.sum() == num_rows
        experts = choices[kept] // capacity
        counts = np.bincount(experts, minlength=E)
        counts[-1] += num_rows - kept.sum()  # The rest (dropped choices) join the last expert.
        np.testing.assert_array_equal(group_sizes, counts)
        sorted_kept = np.flatnonzero(kept)[np.argsort(experts, kind="stable")]
        np.testing.assert_array_equal(token_rows[: kept.sum()], sorted_kept // K)
        np.testing.assert_array_equal(token_rows[choice_rows[kept]], np.flatnonzero(kept) // K)


def test_grouped_gemm_is_chosen_by_the_device_or_forced():
    from keras_vmoe.layers.routing import RoutingPlan

    plan = RoutingPlan(*routing_plan(2.0))
    tokens = keras.ops.ones((G, S, D))
    assert not moe_ops.uses_grouped_gemm(tokens, plan)  # This CPU: the measured-faster paths.
    with moe_ops.grouped_gemm(True):
        assert moe_ops.uses_grouped_gemm(tokens, plan)
        with moe_ops.grouped_gemm(False):
            assert not moe_ops.uses_grouped_gemm(tokens, plan)
    assert not moe_ops.uses_grouped_gemm(tokens, plan)


@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("capacity, renormalize", [(2, False), (4, True), (12, False)])
def test_top_k_experts_plan_override_equals_the_reference_with_gradients(
    batch_priority, masked, capacity, renormalize
):
    """The backend's plan builder (eager PyTorch's torch calls) against the
    `keras.ops` reference: the same tables, dtypes and gradients; capacities 2
    and 4 drop choices, 12 leaves slots empty."""
    from keras_vmoe.layers import routing_plans

    if moe_ops.plan_builder("top_k_experts_plan") is None:
        pytest.skip(f"{backend()} builds plans with the reference")
    rng = np.random.RandomState(8)
    logits = rng.randn(G, S, E).astype("float32")
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    token_mask = rng.rand(G, S) > 0.3 if masked else None
    options = dict(batch_priority=batch_priority, token_mask=token_mask, renormalize=renormalize)

    def build(function):
        return function(scores, scores, K, capacity, **options)

    (got_plan, got_kept), (want_plan, want_kept) = (
        build(routing_plans.top_k_experts_plan),
        build(routing_plans.reference_top_k_experts_plan),
    )
    for got, want in zip((*got_plan, got_kept), (*want_plan, want_kept)):
        assert keras.backend.standardize_dtype(got.dtype) == keras.backend.standardize_dtype(want.dtype)
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
    if capacity * E < S * K:  # Too few slots: some choices dropped; else some slots empty.
        assert not to_numpy(want_kept).all()
    else:
        assert (to_numpy(want_plan.dispatch_index) == S).any()

    def weights_of(function):
        return lambda gates: function(scores, gates, K, capacity, **options)[0].combine_weights

    got, want = (
        gradients(weights_of(f), (scores,))[0]
        for f in (routing_plans.top_k_experts_plan, routing_plans.reference_top_k_experts_plan)
    )
    assert_close(got, want)
