"""SparseMoE and SoftMoE against brute-force numpy, plus errors, configs and
mixed precision.

Most tests share the shapes below: under JAX every new shape costs
compilations in eager mode, so reusing them keeps the file fast.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

import keras_vmoe.ops as moe_ops
from keras_vmoe.layers import ExpertChoiceRouter
from keras_vmoe.layers import SoftMoE
from keras_vmoe.layers import SoftRouter
from keras_vmoe.layers import SparseMoE
from keras_vmoe.layers import TokenChoiceRouter

try:
    from tests.helpers import to_numpy
except ImportError:  # pragma: no cover - the helper module is optional
    to_numpy = ops.convert_to_numpy

B, T, D, E, H = 2, 8, 4, 4, 8  # batch, tokens per image, hidden, experts, mlp_dim


# --------------------------------------------------------------------------
# numpy references


def np_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def expert_weights(layer):
    return [
        to_numpy(v).astype(np.float64) for v in (layer.kernel_0, layer.bias_0, layer.kernel_1, layer.bias_1)
    ]


def np_expert(weights, e, x):
    kernel_0, bias_0, kernel_1, bias_1 = weights
    return np_gelu(x @ kernel_0[e] + bias_0[e]) @ kernel_1[e] + bias_1[e]


def randomize(layer, seed, scale=0.5):
    """Random (non-zero) weights everywhere, biases included."""
    rng = np.random.RandomState(seed)
    for variable in layer.weights:
        variable.assign(np.asarray(rng.randn(*variable.shape) * scale, "float32"))


def inputs(seed=0, shape=(B, T, D)):
    return np.random.RandomState(seed).randn(*shape).astype("float32")


def np_sparse_from_plan(layer, tokens, plan):
    """Output of a sparse MoE from the router's plan: each kept choice adds
    its weight times its expert's MLP of the token. tokens: (G, S, D)."""
    weights = expert_weights(layer)
    combine_index = to_numpy(plan.combine_index)
    combine_weights = to_numpy(plan.combine_weights).astype(np.float64)
    capacity = to_numpy(plan.dispatch_index).shape[-1]
    num_experts = layer.num_experts
    out = np.zeros(tokens.shape, np.float64)
    for g, s, k in np.ndindex(*combine_index.shape):
        slot = combine_index[g, s, k]
        if slot < num_experts * capacity:
            e = slot // capacity
            out[g, s] += combine_weights[g, s, k] * np_expert(weights, e, tokens[g, s].astype(np.float64))
    return out


_JITTED = {}


def _config_key(layer):
    """What makes two layers trace alike: config (less the name) and shapes."""
    config = sorted((k, v) for k, v in layer.get_config().items() if k != "name")
    return repr(config) + repr([tuple(v.shape) for v in layer.weights])


def call_jitted(layer, x):
    """Calls a layer without side effects (a noise-free router); under JAX
    through `jax.jit`, compiled once per config and shape, where eager mode
    compiles every op for every new shape."""
    if keras.backend.backend() != "jax":
        return layer(x)
    import jax

    key = (type(layer), _config_key(layer))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(
            lambda trainable, non_trainable, x, _layer=layer: _layer.stateless_call(
                trainable, non_trainable, x
            )[0]
        )
    return _JITTED[key](
        [v.value for v in layer.trainable_variables],
        [v.value for v in layer.non_trainable_variables],
        x,
    )


def router_gates(layer, tokens):
    kernel = to_numpy(layer.router.kernel).astype(np.float64)
    return np_softmax(tokens.astype(np.float64) @ kernel)


# --------------------------------------------------------------------------
# SparseMoE


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(num_selected_experts=2, batch_priority=True), dict(router="expert_choice")],
)
def test_sparse_output_shape(kwargs):
    layer = SparseMoE(E, H, **kwargs)
    out = layer(inputs())
    assert tuple(out.shape) == (B, T, D)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert layer.compute_output_shape((B, T, D)) == (B, T, D)
    assert len(layer.trainable_weights) == 5  # 4 expert banks + router kernel
    assert tuple(layer.kernel_0.shape) == (E, D, H)
    assert tuple(layer.kernel_1.shape) == (E, H, D)


def test_sparse_dropped_tokens_get_zero_output():
    # C = ceil(8 * 0.25 / 4) = 1 slot per expert: at least half the tokens of
    # each image are dropped.
    layer = SparseMoE(E, H, capacity_factor=0.25, capacity_multiple_of=None)
    x = inputs(1)
    layer(x)
    randomize(layer, 1)  # non-zero biases: an expert never outputs 0 by chance
    out = to_numpy(layer(x))
    plan, metrics = layer.router(x)
    combine_index = to_numpy(plan.combine_index)
    assert to_numpy(plan.dispatch_index).shape == (B, E, 1)
    dropped = np.all(combine_index == E * 1, axis=-1)  # (B, T)
    assert dropped.sum() >= B * T // 2
    np.testing.assert_array_equal(out[dropped], 0.0)
    assert np.all(np.abs(out[~dropped]).max(axis=-1) > 0)
    np.testing.assert_allclose(out, np_sparse_from_plan(layer, x, plan), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.router_metrics["dropped_tokens"]), dropped.mean(), atol=1e-6)


@pytest.mark.parametrize("batch_priority", [False, True])
def test_sparse_top_all_experts_matches_brute_force(batch_priority):
    # K = E and capacity for every token: out = sum_e gate_e * expert_e(x).
    layer = SparseMoE(E, H, num_selected_experts=E, capacity_factor=1.0, batch_priority=batch_priority)
    x = inputs(2)
    layer(x)
    randomize(layer, 2)
    out = to_numpy(layer(x))
    gates = router_gates(layer, x)  # (B, T, E)
    weights = expert_weights(layer)
    expected = sum(gates[..., e : e + 1] * np_expert(weights, e, x.astype(np.float64)) for e in range(E))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert float(to_numpy(layer.router_metrics["dropped_tokens"])) == 0.0


@pytest.mark.parametrize("grouped", [None, True])  # The device's choice; grouped matmuls forced.
def test_sparse_top2_matches_brute_force(grouped):
    # K = 2 with room for everyone: the two largest gates, unnormalised.
    layer = SparseMoE(E, H, num_selected_experts=2, capacity_factor=2.0, batch_priority=True)
    x = inputs(3)
    layer(x)
    randomize(layer, 3)
    with moe_ops.grouped_gemm(grouped):
        out = to_numpy(layer(x))
    gates = router_gates(layer, x)
    weights = expert_weights(layer)
    expected = np.zeros_like(out, dtype=np.float64)
    for b, t in np.ndindex(B, T):
        for e in np.argsort(-gates[b, t])[:2]:
            expected[b, t] += gates[b, t, e] * np_expert(weights, e, x[b, t].astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grouped", [None, True])
def test_sparse_expert_choice_matches_brute_force(grouped):
    # C = ceil(8 * 1.0 / 4) = 2 -> 4: each expert takes its 4 best tokens.
    layer = SparseMoE(E, H, router="expert_choice", capacity_factor=1.0)
    assert isinstance(layer.router, ExpertChoiceRouter)
    x = inputs(4)
    layer(x)
    randomize(layer, 4)
    with moe_ops.grouped_gemm(grouped):
        out = to_numpy(layer(x))
    gates = router_gates(layer, x)
    weights = expert_weights(layer)
    expected = np.zeros_like(out, dtype=np.float64)
    chosen = np.zeros((B, T), int)
    for b in range(B):
        for e in range(E):
            for t in np.argsort(-gates[b, :, e])[:4]:
                expected[b, t] += gates[b, t, e] * np_expert(weights, e, x[b, t].astype(np.float64))
                chosen[b, t] += 1
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        to_numpy(layer.router_metrics["dropped_tokens"]), np.mean(chosen == 0), atol=1e-6
    )


def test_sparse_group_size_groups_over_batch():
    # 4 images x 4 tokens in groups of 8 = 2 * T: routing groups span images.
    # C = ceil(8 * 0.5 / 4) = 1, so which tokens share a group matters.
    x = inputs(5, (4, 4, D))
    layer = SparseMoE(E, H, group_size=8, capacity_factor=0.5, capacity_multiple_of=None)
    layer(x)
    randomize(layer, 5)
    out = to_numpy(layer(x))
    groups = x.reshape(2, 8, D)
    plan, _ = layer.router(groups)
    assert to_numpy(plan.dispatch_index).shape == (2, E, 1)
    expected = np_sparse_from_plan(layer, groups, plan).reshape(4, 4, D)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # Per-image groups would route differently.
    per_image = x.reshape(4, 4, D)
    per_image_plan, _ = layer.router(per_image)
    per_image_out = np_sparse_from_plan(layer, per_image, per_image_plan)
    assert not np.allclose(out, per_image_out, atol=1e-3)


@pytest.mark.parametrize("cls", [SparseMoE, SoftMoE])
def test_group_size_must_divide_batch_tokens(cls):
    layer = cls(E, H, group_size=3)
    with pytest.raises(ValueError, match=r"16 tokens.*group_size=3"):
        layer(inputs())


def test_sparse_unknown_router_raises():
    with pytest.raises(ValueError, match=r"unknown router 'switch'.*'expert_choice', 'token_choice'"):
        SparseMoE(E, H, router="switch")
    with pytest.raises(ValueError, match="Router instance"):
        SparseMoE(E, H, router=42)


def test_sparse_router_instance():
    router = TokenChoiceRouter(E, num_selected_experts=2, name="router")
    layer = SparseMoE(E, H, router=router)
    assert layer.router is router
    assert tuple(layer(inputs()).shape) == (B, T, D)
    with pytest.raises(ValueError, match=r"router has 3 experts.*num_experts=4"):
        SparseMoE(E, H, router=TokenChoiceRouter(3))


def test_sparse_auxiliary_loss_only_in_training():
    layer = SparseMoE(E, H, noise_std=0.0, importance_loss_weight=0.01, gshard_loss_weight=0.02)
    x = inputs(6)
    layer(x)
    assert len(layer.losses) == 0
    layer(x, training=True)
    assert len(layer.losses) == 1
    loss = float(to_numpy(layer.losses[0]))
    _, metrics = layer.router(x, training=True)
    np.testing.assert_allclose(loss, np.mean(to_numpy(metrics["auxiliary_loss"])), rtol=1e-5)
    # ... which is 0.01 * importance + 0.02 * GShard, averaged over images.
    gates = router_gates(layer, x)
    importance = gates.sum(axis=1)
    importance_loss = (importance.std(-1) / importance.mean(-1)) ** 2
    top1 = np.eye(E)[gates.argmax(-1)]
    gshard = E**2 * np.mean(top1.mean(1) * gates.mean(1), axis=-1)
    np.testing.assert_allclose(loss, np.mean(0.01 * importance_loss + 0.02 * gshard), rtol=1e-4)
    np.testing.assert_allclose(float(to_numpy(layer.router_metrics["auxiliary_loss"])), loss, rtol=1e-6)
    # Evaluation clears it again; with noise, training adds the load loss too.
    layer(x, training=False)
    assert len(layer.losses) == 0
    noisy = SparseMoE(E, H, seed=0)
    noisy(x, training=True)
    assert len(noisy.losses) == 1
    assert "load_loss" in noisy.router_metrics
    assert float(to_numpy(noisy.losses[0])) > 0


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_sparse_router_metrics(router):
    layer = SparseMoE(E, H, router=router)
    assert layer.router_metrics == {}
    layer(inputs())
    metrics = layer.router_metrics
    assert {"auxiliary_loss", "dropped_tokens"} <= set(metrics)
    for value in metrics.values():
        assert tuple(ops.shape(value)) == ()
    dropped = float(to_numpy(metrics["dropped_tokens"]))
    assert 0.0 <= dropped <= 1.0
    if router == "expert_choice":
        assert float(to_numpy(metrics["auxiliary_loss"])) == 0.0


# --------------------------------------------------------------------------
# SoftMoE


def np_soft_moe(layer, x, group_size):
    """Brute-force Soft MoE: normalised tokens and slots, one set of logits,
    softmax over tokens (dispatch) and over all slots (combine)."""
    tokens = x.astype(np.float64).reshape(-1, group_size, x.shape[-1])
    mu = to_numpy(layer.router.mu).astype(np.float64)
    scale = float(to_numpy(layer.router.scale))
    xn = tokens / np.sqrt(np.sum(tokens**2, axis=-1, keepdims=True) + 1e-6)
    mun = mu / np.sqrt(np.sum(mu**2, axis=0, keepdims=True) + 1e-6)
    logits = scale * np.einsum("gsd,dep->gsep", xn, mun)
    G, S, num_experts, P = logits.shape
    dispatch = np_softmax(logits, axis=1)
    combine = np_softmax(logits.reshape(G, S, -1), axis=-1).reshape(logits.shape)
    slots = np.einsum("gsep,gsd->gepd", dispatch, tokens)
    weights = expert_weights(layer)
    outs = np.stack([np_expert(weights, e, slots[:, e]) for e in range(num_experts)], axis=1)
    return np.einsum("gsep,gepd->gsd", combine, outs).reshape(x.shape)


def soft_layer(weight_seed, slots_per_expert=2, **kwargs):
    layer = SoftMoE(E, H, slots_per_expert=slots_per_expert, **kwargs)
    layer(inputs())
    randomize(layer, weight_seed)
    layer.router.scale.assign(np.array(1.0 + weight_seed % 5, "float32"))
    return layer


@settings(max_examples=25, deadline=None)
@given(
    num_groups=st.sampled_from([1, 2]),
    num_experts=st.sampled_from([2, 4]),
    slots_per_expert=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_soft_router_weights_sum_to_one(num_groups, num_experts, slots_per_expert, seed):
    rng = np.random.RandomState(seed)
    router = SoftRouter(num_experts, slots_per_expert)
    router.build((None, None, D))
    router.mu.assign(rng.randn(D, num_experts, slots_per_expert).astype("float32"))
    scale = np.float32(rng.uniform(0.5, 5.0))
    router.scale.assign(np.asarray(scale))
    x = rng.randn(num_groups, T, D).astype("float32")
    (dispatch, combine), metrics = call_jitted(router, x)  # A SoftRoutingPlan.
    dispatch, combine = to_numpy(dispatch), to_numpy(combine)
    assert dispatch.shape == combine.shape == (num_groups, T, num_experts, slots_per_expert)
    np.testing.assert_allclose(dispatch.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(combine.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    assert np.all(dispatch >= 0) and np.all(combine >= 0)
    np.testing.assert_array_equal(to_numpy(metrics["auxiliary_loss"]), np.zeros(num_groups))
    # Both come from one set of logits: scale * <x / |x|, mu / |mu|>.
    xn = x / np.sqrt((x.astype(np.float64) ** 2).sum(-1, keepdims=True) + 1e-6)
    mu = to_numpy(router.mu).astype(np.float64)
    mun = mu / np.sqrt((mu**2).sum(0, keepdims=True) + 1e-6)
    logits = scale * np.einsum("gsd,dep->gsep", xn, mun)
    np.testing.assert_allclose(dispatch, np_softmax(logits, axis=1), rtol=1e-4, atol=1e-6)
    flat = np_softmax(logits.reshape(num_groups, T, -1), axis=-1)
    np.testing.assert_allclose(combine, flat.reshape(logits.shape), rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_soft_moe_permutation_and_batch_independence(seed):
    rng = np.random.RandomState(seed)
    layer = soft_layer(seed % 1000)
    x = rng.randn(B, T, D).astype("float32")
    out = to_numpy(layer(x))
    # Permuting an image's tokens permutes its output the same way.
    perm = rng.permutation(T)
    out_perm = to_numpy(layer(x[:, perm]))
    np.testing.assert_allclose(out_perm, out[:, perm], atol=1e-5, rtol=1e-5)
    # An image's output does not depend on the other images in the batch.
    other = x.copy()
    other[1] = rng.randn(T, D) * 3.0
    out_other = to_numpy(layer(other))
    np.testing.assert_allclose(out_other[0], out[0], atol=1e-5, rtol=1e-5)
    assert not np.allclose(out_other[1], out[1], atol=1e-3)


@pytest.mark.parametrize("group_size", [None, 2 * T])
def test_soft_moe_matches_brute_force(group_size):
    layer = soft_layer(7, group_size=group_size)
    x = inputs(7)
    out = to_numpy(layer(x))
    expected = np_soft_moe(layer, x, group_size or T)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    if group_size:  # groups span images: the per-image reference differs
        assert not np.allclose(out, np_soft_moe(layer, x, T), atol=1e-4)


def test_soft_moe_bfloat16_dispatch_changes_output_slightly():
    x = inputs(8)
    exact = soft_layer(8)
    rounded = SoftMoE(E, H, slots_per_expert=2, dispatch_dtype="bfloat16")
    rounded(x)
    rounded.set_weights(exact.get_weights())
    out = to_numpy(exact(x))
    out_rounded = to_numpy(rounded(x))
    assert keras.backend.standardize_dtype(rounded(x).dtype) == "float32"
    assert not np.array_equal(out, out_rounded)
    np.testing.assert_allclose(out_rounded, out, atol=1e-2, rtol=1e-2)


def test_sparse_bfloat16_dispatch_changes_output_slightly():
    x = inputs(9)
    kwargs = dict(num_selected_experts=2, capacity_factor=2.0, batch_priority=True)
    exact = SparseMoE(E, H, **kwargs)
    exact(x)
    randomize(exact, 9)
    rounded = SparseMoE(E, H, dispatch_dtype="bfloat16", **kwargs)
    rounded(x)
    rounded.set_weights(exact.get_weights())
    out, out_rounded = to_numpy(exact(x)), to_numpy(rounded(x))
    assert not np.array_equal(out, out_rounded)
    np.testing.assert_allclose(out_rounded, out, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "capacity_factor, group_size, slots",
    [(1.0, None, 2), (1.2, None, 2), (0.5, None, 1), (0.6, 2 * T, 2)],
)
def test_soft_moe_capacity_factor_sets_slots(capacity_factor, group_size, slots):
    # slots = round(S * cf / E), not ceil: 8 * 1.2 / 4 = 2.4 -> 2,
    # 16 * 0.6 / 4 = 2.4 -> 2, 8 * 0.5 / 4 = 1.
    layer = SoftMoE(E, H, capacity_factor=capacity_factor, group_size=group_size)
    assert layer.num_slots(group_size or T) == slots
    assert tuple(layer(inputs()).shape) == (B, T, D)
    assert layer.router.slots_per_expert == slots
    assert tuple(layer.router.mu.shape) == (D, E, slots)


def test_soft_moe_errors():
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(E, H, slots_per_expert=0)
    with pytest.raises(ValueError, match=r"slots_per_expert.*capacity_factor"):
        SoftMoE(E, H, slots_per_expert=None, capacity_factor=None)
    with pytest.raises(ValueError, match="not both"):
        SoftMoE(E, H, slots_per_expert=2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        SoftMoE(E, H, slots_per_expert=None, capacity_factor=0.0)
    # round(8 * 0.1 / 4) = 0 slots.
    with pytest.raises(ValueError, match="capacity"):
        SoftMoE(E, H, capacity_factor=0.1)(inputs())


@pytest.mark.parametrize("cls", [SparseMoE, SoftMoE])
def test_invalid_dispatch_dtype_raises(cls):
    with pytest.raises(ValueError, match=r"dispatch_dtype.*'int8'"):
        cls(E, H, dispatch_dtype="int8")


@pytest.mark.parametrize("cls", [SparseMoE, SoftMoE])
def test_layer_argument_errors(cls):
    with pytest.raises(ValueError, match="num_experts"):
        cls(0, H)
    with pytest.raises(ValueError, match="mlp_dim"):
        cls(E, 0)
    with pytest.raises(ValueError, match="dropout_rate"):
        cls(E, H, dropout_rate=1.5)


def test_soft_moe_noise_only_in_training():
    layer = soft_layer(10, noise_std=0.5, seed=1)
    x = inputs(10)
    eval_out = to_numpy(layer(x))
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), eval_out)
    assert not np.allclose(to_numpy(layer(x, training=True)), eval_out, atol=1e-4)
    quiet = soft_layer(10)
    np.testing.assert_allclose(to_numpy(quiet(x, training=True)), to_numpy(quiet(x)), atol=1e-6)


# --------------------------------------------------------------------------
# configs


SPARSE_CONFIGS = [
    # round(8 * 2 * 2.0 / 4) = 8 slots, as in the top-2 tests above.
    dict(
        num_selected_experts=2,
        capacity_factor=2.0,
        group_size=T,
        batch_priority=True,
        noise_std=0.5,
        importance_loss_weight=0.01,
        load_loss_weight=0.02,
        gshard_loss_weight=0.03,
        z_loss_weight=0.04,
        capacity_rounding="round",
        capacity_multiple_of=None,
        approximate_gelu=False,
        dropout_rate=0.1,
        dispatch_dtype="bfloat16",
        seed=3,
    ),
    dict(router="expert_choice", capacity_factor=2.0, noise_std=0.0),
]


@pytest.mark.parametrize("kwargs", SPARSE_CONFIGS)
def test_sparse_config_round_trip(kwargs):
    layer = SparseMoE(E, H, name="moe", **kwargs)
    config = layer.get_config()
    for name in ("group_size", "approximate_gelu", "dropout_rate", "dispatch_dtype"):
        if name in kwargs:
            assert config[name] == kwargs[name]
    router_config = config["router"]["config"]
    for name in (
        "num_selected_experts",
        "capacity_factor",
        "batch_priority",
        "noise_std",
        "z_loss_weight",
        "capacity_rounding",
        "capacity_multiple_of",
        "seed",
    ):
        if name in kwargs:
            assert router_config[name] == kwargs[name], name
    clone = SparseMoE.from_config(config)
    assert type(clone.router) is type(layer.router)
    assert clone.get_config() == config
    assert clone.router.get_config() == layer.router.get_config()
    # Same weights, same output.
    x = inputs(11)
    layer(x)
    randomize(layer, 11)
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(layer(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(slots_per_expert=2, noise_std=0.1, dispatch_dtype="bfloat16", seed=2),
        dict(slots_per_expert=None, capacity_factor=0.6, group_size=2 * T, approximate_gelu=False),
    ],
)
def test_soft_config_round_trip(kwargs):
    layer = SoftMoE(E, H, name="soft", **kwargs)
    config = layer.get_config()
    for name, value in kwargs.items():
        assert config[name] == value, name
    clone = SoftMoE.from_config(config)
    assert clone.get_config() == config
    x = inputs(12)
    layer(x)
    randomize(layer, 12)
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(layer(x)), rtol=1e-6, atol=1e-6)
    # Through Keras serialization too (registered under keras_vmoe).
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is SoftMoE and revived.get_config() == config


def test_sparse_config_round_trip_of_built_layer():
    layer = SparseMoE(E, H)
    x = inputs(13)
    layer(x)
    clone = SparseMoE.from_config(layer.get_config())
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(layer(x)), rtol=1e-6)


# --------------------------------------------------------------------------
# mixed precision


@pytest.mark.parametrize(
    "make",
    [
        lambda: SparseMoE(E, H, num_selected_experts=2, dtype="mixed_bfloat16"),
        lambda: SparseMoE(E, H, router="expert_choice", dtype="mixed_bfloat16"),
        lambda: SoftMoE(E, H, slots_per_expert=2, dtype="mixed_bfloat16"),
    ],
)
def test_mixed_precision(make):
    layer = make()
    config = layer.get_config()
    x = inputs(14)
    out = layer(x, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.kernel_0.dtype) == "float32"
    assert layer.router.dtype_policy.name == "float32"
    assert layer.router_metrics
    for name, value in layer.router_metrics.items():
        assert keras.backend.standardize_dtype(value.dtype) == "float32", name
    assert len(layer.losses) == 1
    assert keras.backend.standardize_dtype(layer.losses[0].dtype) == "float32"
    tokens = ops.cast(x, "bfloat16")
    if isinstance(layer, SparseMoE):
        logits = layer.router.gate_logits(tokens)
        assert keras.backend.standardize_dtype(logits.dtype) == "float32"
        plan, metrics = layer.router(tokens)
        assert keras.backend.standardize_dtype(plan.combine_weights.dtype) == "float32"
    else:
        (dispatch, combine), metrics = layer.router(tokens)
        assert keras.backend.standardize_dtype(dispatch.dtype) == "float32"
        assert keras.backend.standardize_dtype(combine.dtype) == "float32"
    for value in metrics.values():
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
    # Close to the float32 layer with the same weights. Inputs already in
    # bfloat16 make both routers see the same tokens, hence the same plan.
    reference = type(layer).from_config({**config, "dtype": "float32"})
    x16 = to_numpy(ops.cast(tokens, "float32"))
    reference(x16)
    reference.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        to_numpy(ops.cast(layer(x16), "float32")), to_numpy(reference(x16)), atol=0.05, rtol=0.05
    )


# JAX compiles every eager op for every new shape: fewer examples there.
@settings(max_examples=5 if keras.backend.backend() == "jax" else 15, deadline=None)
@given(
    num_experts=st.integers(1, 5),
    k=st.integers(1, 3),
    capacity_factor=st.sampled_from([0.25, 0.6, 1.0, 2.0]),
    tokens=st.integers(3, 9),
    batch=st.integers(1, 3),
    router=st.sampled_from(["token_choice", "expert_choice"]),
    batch_priority=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_sparse_moe_equals_its_plan_on_random_shapes(
    num_experts, k, capacity_factor, tokens, batch, router, batch_priority, seed
):
    """Every backend's dispatch path (padded or occupied-slots-only) gives each
    kept choice its gate times its expert's output, and dropped tokens zero."""
    options = dict(num_selected_experts=min(k, num_experts), batch_priority=batch_priority)
    if router == "expert_choice":
        options = dict(capacity_multiple_of=None)
        capacity_factor = min(capacity_factor, 1.0)  # at most every token per expert
    layer = SparseMoE(num_experts, 6, router=router, capacity_factor=capacity_factor, seed=seed, **options)
    x = np.random.RandomState(seed).randn(batch, tokens, 5).astype("float32")
    layer(x)
    randomize(layer, seed)
    out = to_numpy(layer(x))
    plan, _ = layer.router(x)
    np.testing.assert_allclose(out, np_sparse_from_plan(layer, x, plan), rtol=1e-4, atol=1e-5)
    dropped = np.all(to_numpy(plan.combine_weights) == 0, axis=-1)
    np.testing.assert_array_equal(out[dropped], 0.0)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile")
@pytest.mark.parametrize("grouped", [None, True])
@pytest.mark.parametrize("make", [lambda: SparseMoE(E, H, num_selected_experts=2), lambda: SoftMoE(E, H)])
def test_moe_layers_compile_with_no_graph_break(make, grouped):
    # Keras' `jit_compile=True` on PyTorch is torch.compile: no host copy of the
    # routing (a graph break) in training, routing noise included.
    import torch

    layer = make()
    x = torch.tensor(inputs(5))
    layer(x)
    with moe_ops.grouped_gemm(grouped):
        explained = torch._dynamo.explain(lambda x: layer(x, training=True))(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(lambda x: layer(x, training=False))
        np.testing.assert_allclose(to_numpy(compiled(x)), to_numpy(layer(x)), rtol=1e-5, atol=1e-6)
