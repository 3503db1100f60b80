"""E^3 (efficient ensembles of experts): routing invariants, training, saving,
upcycling and bad input. Parity with vmoe is in tests/convert/test_vmoe_ensemble.py."""

import keras
import numpy as np
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_vmoe
from keras_vmoe.layers import SparseMoE
from keras_vmoe.layers import ensemble_log_mean
from keras_vmoe.layers import member_logits
from keras_vmoe.models import VisionTransformerBackbone
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import count_flops
from keras_vmoe.models import selected_experts
from keras_vmoe.models.routing_inspection import router_inputs
from tests.helpers import decision_margin
from tests.helpers import f32_atol
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy

E, CLASSES, BATCH = 8, 5, 4
TOKENS = 17  # 16 patches and the class token.
_MODELS = {}


def classifier(num_experts=E, ensemble_size=1, num_selected_experts=1, **options):
    """A 3-block V-MoE (MoE blocks 1 and 2) or E^3 classifier, built once per configuration."""
    key = (num_experts, ensemble_size, num_selected_experts, tuple(sorted(options.items())))
    if key not in _MODELS:
        keras.utils.set_random_seed(len(_MODELS))
        backbone = VMoEBackbone(
            **tiny_vit_arguments(num_layers=3),
            moe_layers=(1, 2),
            num_experts=num_experts,
            num_selected_experts=num_selected_experts,
            ensemble_size=ensemble_size,
            **options,
        )
        _MODELS[key] = VMoEImageClassifier(backbone, num_classes=CLASSES)
    return _MODELS[key]


def randomize(model, seed):
    """Every weight random (router kernels scaled up, so that routing is far from uniform)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        scale = 2.0 if "router" in variable.path else 0.2
        variable.assign(rng.normal(0, scale, variable.shape).astype("float32"))


def copy_member(ensemble, single, member):
    """Gives `single` (a V-MoE of E / M experts) the weights of E^3 member `member`:
    the shared weights as they are, its pool's experts and router columns."""
    members = ensemble.ensemble_size
    for source, target in zip(ensemble.weights, single.weights, strict=True):
        value = to_numpy(source)
        if source.shape != target.shape:
            pool = target.shape[0] if source.shape[0] == E else target.shape[-1]
            index = slice(member * pool, (member + 1) * pool)
            assert pool * members == E, (source.path, source.shape, target.shape)
            value = value[index] if source.shape[0] == E else value[..., index]
        target.assign(value)


CONFIGS = [(2, 1), (2, 2), (4, 1), (4, 2)]  # (M, K): K <= E / M.


@settings(max_examples=8, deadline=None)
@given(config=st.sampled_from(CONFIGS), seed=st.integers(0, 2**31 - 1))
def test_each_member_is_a_vmoe_on_its_own_pool_of_experts(config, seed):
    members, k = config
    ensemble = classifier(ensemble_size=members, num_selected_experts=k)
    single = classifier(num_experts=E // members, num_selected_experts=k)
    randomize(ensemble, seed % 10_000)
    images = random_images(BATCH, seed=seed % 10_000)
    logits = to_numpy(ensemble(images))  # (B * M, C), row b * M + m = member m of image b
    assert logits.shape == (BATCH * members, CLASSES)
    pool = E // members
    for block, tokens in router_inputs(ensemble.backbone, images).items():
        # The member-by-member comparison below runs other matmul shapes: skip
        # draws where a last-bit difference could flip a top-K choice.
        moe = ensemble.backbone.get_layer(f"encoder_block_{block}").mlp
        gates = moe.router.route_gates(tokens, False, None, **moe.routing_inputs(tokens))[0]
        assume(decision_margin(to_numpy(gates), k) > 1e-5)
    chosen = selected_experts(ensemble.backbone, images)
    for block in (1, 2):
        experts = chosen[block].reshape(BATCH, members, TOKENS, E)
        for m in range(members):
            # Member m routes only within experts m * E / M ... (m + 1) * E / M - 1.
            outside = np.delete(experts[:, m], np.s_[m * pool : (m + 1) * pool], axis=-1)
            assert not outside.any(), (block, m)
            assert experts[:, m].any()
    # Member m computes exactly what a V-MoE of its E / M experts and router
    # columns computes (same capacity, same priority order, even with drops);
    # for M = 1 this is the plain V-MoE.
    for m in range(members):
        copy_member(ensemble, single, m)
        expected = to_numpy(single(images))
        np.testing.assert_allclose(logits[m::members], expected, rtol=0, atol=f32_atol(expected))
    # Members differ exactly where their router parameters differ: with every
    # pool holding the same experts, members agree iff their router columns do
    # (unless K = E / M: a member then mixes all of its identical experts).
    for moe in ensemble.backbone.moe_mlps:
        for variable in (moe.kernel_0, moe.bias_0, moe.kernel_1, moe.bias_1):
            value = to_numpy(variable)
            variable.assign(np.concatenate([value[:pool]] * members))
    different = to_numpy(ensemble(images)).reshape(BATCH, members, CLASSES)
    if k < pool:
        assert all(np.abs(different[:, m] - different[:, 0]).max() > 1e-4 for m in range(1, members))
    for moe in ensemble.backbone.moe_mlps:
        kernel = to_numpy(moe.router.kernel)
        moe.router.kernel.assign(np.concatenate([kernel[:, :pool]] * members, axis=1))
    same = to_numpy(ensemble(images)).reshape(BATCH, members, CLASSES)
    for m in range(1, members):
        np.testing.assert_allclose(same[:, m], same[:, 0], rtol=0, atol=f32_atol(same))


@settings(max_examples=6, deadline=None)
@given(members=st.sampled_from([2, 4]), seed=st.integers(0, 2**31 - 1))
def test_prediction_is_independent_of_the_batch_when_nothing_is_dropped(members, seed):
    # Two images per routing group, and room in every expert for all of a
    # member's tokens of the group: cf = E / (M * K).
    model = classifier(ensemble_size=members, group_size=2 * TOKENS * members, capacity_factor=E / members)
    randomize(model, seed % 10_000)
    images = random_images(BATCH, seed=seed % 10_000)
    prediction = to_numpy(ensemble_log_mean(model(images), members))
    for moe in model.backbone.moe_mlps:
        assert float(to_numpy(moe.router_metrics["dropped_tokens"])) == 0.0
    changed = images.copy()
    changed[1::2] = random_images(BATCH // 2, seed=seed % 10_000 + 1) * 3  # The other image of each group.
    again = to_numpy(ensemble_log_mean(model(changed), members))
    np.testing.assert_allclose(again[0::2], prediction[0::2], rtol=0, atol=f32_atol(prediction))
    assert np.abs(again[1::2] - prediction[1::2]).max() > 1e-4


@settings(max_examples=20, deadline=None)
@given(
    members=st.integers(1, 4),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_ensemble_log_mean_and_member_logits_against_numpy(members, rows, seed):
    logits = np.random.default_rng(seed).normal(0, 4, (rows * members, 7)).astype("float32")
    exact = logits.astype("float64").reshape(rows, members, 7)
    probabilities = np.exp(exact - exact.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    expected = np.log(probabilities.mean(1))
    np.testing.assert_allclose(to_numpy(ensemble_log_mean(logits, members)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(to_numpy(member_logits(logits, members)), logits.reshape(rows, members, 7))


def test_fit_evaluate_predict_save_and_load(tmp_path):
    keras.utils.set_random_seed(1)
    backbone = VMoEBackbone(
        **tiny_vit_arguments(num_layers=3), moe_layers=(1, 2), num_experts=4, ensemble_size=2
    )
    model = VMoEImageClassifier(backbone, num_classes=CLASSES)
    images = random_images(8, seed=3)
    labels = np.arange(8) % CLASSES
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(images, labels, batch_size=4, epochs=4, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert history["moe_auxiliary_loss"][0] > 0 and "sparse_categorical_accuracy" in history
    # Evaluation: the loss is vmoe's ensemble cross-entropy (every member
    # against its image's label), the metrics are the ensemble's.
    logits = to_numpy(model(images)).astype("float64")  # (16, C)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    members_loss = -np.mean(log_probs[np.arange(16), np.repeat(labels, 2)])
    ensemble = np.log(np.exp(log_probs).reshape(8, 2, CLASSES).mean(1))
    results = model.evaluate(images, labels, batch_size=8, verbose=0, return_dict=True)
    assert results["loss"] == pytest.approx(members_loss, rel=1e-5)
    assert results["sparse_categorical_accuracy"] == pytest.approx(np.mean(ensemble.argmax(-1) == labels))
    prediction = model.predict(images, batch_size=8, verbose=0)
    np.testing.assert_allclose(prediction, ensemble, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        model.predict_members(images, verbose=0), logits.reshape(8, 2, CLASSES), atol=1e-5
    )
    model.save(tmp_path / "e3.keras")
    restored = keras.saving.load_model(tmp_path / "e3.keras")
    assert restored.ensemble_size == 2 and restored.backbone.moe_mlps[0].router.expert_partitions == 2
    np.testing.assert_allclose(
        restored.predict(images, verbose=0), prediction, rtol=0, atol=f32_atol(prediction)
    )
    model.save_to_preset(str(tmp_path / "preset"))
    restored = VMoEImageClassifier.from_preset(str(tmp_path / "preset"))
    assert restored.backbone.get_config()["ensemble_size"] == 2
    np.testing.assert_allclose(
        restored.predict(images, verbose=0), prediction, rtol=0, atol=f32_atol(prediction)
    )


def test_upcycling_a_dense_model_and_a_vmoe_to_e3():
    keras.utils.set_random_seed(2)
    dense = VMoEImageClassifier(VMoEBackbone(**tiny_vit_arguments(num_layers=3)), num_classes=CLASSES)
    images = random_images(BATCH, seed=4)
    # Every member takes both experts of its pool (K = E / M) and capacity
    # drops nothing: each member computes the dense function.
    e3 = keras_vmoe.upcycle(dense, 4, (1, 2), num_selected_experts=2, capacity_factor=2.0, ensemble_size=2)
    assert e3.ensemble_size == 2
    expected = np.repeat(to_numpy(dense(images)), 2, axis=0)
    np.testing.assert_allclose(to_numpy(e3(images)), expected, rtol=0, atol=1e-5)
    # A V-MoE to E^3: the same experts, the router kernel kept as it is (vmoe's
    # (D, E) -> (D, M, E / M) reshape), member m routing within pool m.
    vmoe = classifier()
    randomize(vmoe, 5)
    e3 = keras_vmoe.upcycle(vmoe, E, (), num_selected_experts=1, ensemble_size=2)
    assert e3.backbone.moe_layers == (1, 2) and e3.count_params() == vmoe.count_params()
    for source, target in zip(vmoe.weights, e3.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(target), to_numpy(source), err_msg=source.path)
    flops, ensemble_flops = count_flops(vmoe), count_flops(e3)
    assert ensemble_flops["head"] == 2 * flops["head"] and ensemble_flops["total"] > flops["total"]
    with pytest.raises(ValueError, match="need a sparse router, not 'soft'"):
        keras_vmoe.upcycle(dense, 4, (1,), router="soft", ensemble_size=2)
    with pytest.raises(ValueError, match="num_experts must be 8, got 4"):
        keras_vmoe.upcycle(vmoe, 4, (), ensemble_size=2)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(ensemble_size=0), r"`ensemble_size` must be >= 1, got 0"),
        (dict(ensemble_size=3), "ensemble_size=3 must divide num_experts=8"),
        (
            dict(ensemble_size=2, num_selected_experts=5),
            r"K=5\) cannot exceed the 4 experts of each of the 2 pools",
        ),
        (dict(ensemble_size=2, group_size=35), "group_size=35 must be a multiple of ensemble_size=2"),
        (dict(ensemble_size=2, router="expert_choice"), "needs a token-choice router that routes within"),
    ],
)
def test_bad_ensemble_configurations(options, message):
    with pytest.raises(ValueError, match=message):
        VMoEBackbone(**tiny_vit_arguments(num_layers=3), moe_layers=(1, 2), num_experts=E, **options)


def test_bad_ensemble_inputs():
    with pytest.raises(ValueError, match="ensemble_size=2 needs MoE layers"):
        VisionTransformerBackbone(**tiny_vit_arguments(), ensemble_size=2)
    with pytest.raises(ValueError, match="5 rows of logits do not split into ensembles of 2"):
        member_logits(np.zeros((5, 3), "float32"), 2)
    layer = SparseMoE(4, 8, ensemble_size=2)
    with pytest.raises(ValueError, match="call it with `token_partitions`"):
        layer.router(keras.ops.ones((1, 4, 8)))
