"""LIMoE's entropy losses against hand computations, the token mask, and the router."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe.layers import MultimodalTokenChoiceRouter
from keras_vmoe.layers import SparseMoE
from keras_vmoe.layers import TokenChoiceRouter
from keras_vmoe.layers import global_entropy_loss
from keras_vmoe.layers import local_entropy_loss
from tests.helpers import to_numpy

# Two groups of three tokens over E = 2 experts.
GATES = np.array([[[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]], [[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]], "float32")
IMAGE_MASK = np.array([[True, True, False], [True, False, False]])


def entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_local_entropy_is_the_mean_token_entropy_of_the_modality():
    expected = (entropy([0.5, 0.5]) + entropy([1.0, 0.0]) + entropy([0.2, 0.8])) / 3
    assert float(to_numpy(local_entropy_loss(GATES, IMAGE_MASK))) == pytest.approx(expected, rel=1e-5)


def test_global_entropy_is_thresholded_entropy_of_the_mean_routing():
    mean = (GATES[0, 0] + GATES[0, 1] + GATES[1, 0]) / 3  # [0.5667, 0.4333]
    for threshold in (0.5, math.log(2)):
        expected = max(0.0, threshold - entropy(mean))
        value = float(to_numpy(global_entropy_loss(GATES, IMAGE_MASK, threshold)))
        assert value == pytest.approx(expected, abs=1e-6)
    assert entropy(mean) > 0.5  # The first threshold is met: no loss.
    empty = np.zeros_like(IMAGE_MASK)
    assert float(to_numpy(global_entropy_loss(GATES, empty, 1.0))) == 0.0
    assert float(to_numpy(local_entropy_loss(GATES, empty))) == 0.0


def test_padding_is_not_routed_and_leaves_the_losses_alone():
    tokens = np.random.RandomState(0).normal(size=(2, 8, 6)).astype("float32")
    mask = np.ones((2, 8), bool)
    mask[:, 6:] = False
    for batch_priority in (False, True):
        router = TokenChoiceRouter(
            4, num_selected_experts=2, capacity_factor=2.0, batch_priority=batch_priority, noise_std=0.0
        )
        plan, metrics = router(tokens, token_mask=mask)
        combine_index = to_numpy(plan.combine_index)
        dropped_slot = 4 * router.capacity(8)
        assert (combine_index[:, 6:] == dropped_slot).all()
        assert (to_numpy(plan.combine_weights)[:, 6:] == 0).all()
        assert not np.isin(to_numpy(plan.dispatch_index), [6, 7]).any()
        # The losses equal those of the real tokens routed alone.
        _, alone = router(tokens[:, :6])
        # Other matmul shapes: last-bit gate differences, which the squared
        # coefficient of variation can magnify where a group is balanced.
        np.testing.assert_allclose(
            to_numpy(metrics["importance_loss"]), to_numpy(alone["importance_loss"]), rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(
            to_numpy(metrics["gshard_loss"]), to_numpy(alone["gshard_loss"]), rtol=1e-5, atol=1e-7
        )


def test_multimodal_router_adds_weighted_entropy_losses_and_trains_the_router():
    tokens = np.random.RandomState(1).normal(size=(2, 6, 8)).astype("float32")
    modalities = np.array([[0, 0, 0, 0, 1, -1], [0, 0, 0, 0, 1, 1]], "int32")
    router = MultimodalTokenChoiceRouter(
        4,
        batch_priority=True,
        noise_std=0.0,
        local_entropy_weights={"image": 0.5, "text": 0.0},
        global_entropy_weights=0.25,
        global_entropy_thresholds=math.log(4),
    )
    plan, metrics = router(tokens, token_modalities=modalities)
    gates = to_numpy(ops.softmax(router.gate_logits(tokens), axis=-1))
    image = modalities == 0
    assert to_numpy(metrics["image_local_entropy"])[0] == pytest.approx(
        float(to_numpy(local_entropy_loss(gates, image))), rel=1e-5
    )
    plain = TokenChoiceRouter(4, batch_priority=True, noise_std=0.0)
    plain.build(tokens.shape)
    plain.kernel.assign(router.kernel)
    _, base = plain(tokens, token_mask=modalities >= 0)
    expected = (
        to_numpy(base["auxiliary_loss"])
        + 0.5 * to_numpy(metrics["image_local_entropy"])
        + 0.25 * (to_numpy(metrics["image_global_entropy"]) + to_numpy(metrics["text_global_entropy"]))
    )
    np.testing.assert_allclose(to_numpy(metrics["auxiliary_loss"]), expected, rtol=1e-5)
    restored = MultimodalTokenChoiceRouter.from_config(router.get_config())
    assert restored.local_entropy_weights == {"image": 0.5, "text": 0.0}
    with pytest.raises(ValueError, match="not among the modalities"):
        MultimodalTokenChoiceRouter(4, local_entropy_weights={"audio": 1.0})

    # The entropy terms reach the router kernel: a SparseMoE whose only
    # auxiliary losses are LIMoE's has a non-zero gradient there.
    if keras.backend.backend() == "jax":
        import jax

        moe = SparseMoE(
            4,
            16,
            router=MultimodalTokenChoiceRouter(
                4, noise_std=0.0, importance_loss_weight=0.0, load_loss_weight=0.0
            ),
        )
        moe(tokens, token_modalities=modalities)

        def auxiliary(kernel):
            logits = ops.matmul(tokens, kernel)
            gates = ops.softmax(logits, axis=-1)
            return local_entropy_loss(gates, image) + global_entropy_loss(gates, image, math.log(4))

        grad = jax.grad(auxiliary)(moe.router.kernel.value)
        assert float(np.abs(np.asarray(grad)).sum()) > 0
    with pytest.raises(ValueError, match="does not use them"):
        SparseMoE(4, 16)(tokens, token_modalities=modalities)
