"""router_inputs / expert_assignments: which expert each token goes to.

The assignments are checked against what the routers' own outputs say,
derived here independently: for a sparse block, from the plan's
`dispatch_index` (which token sits in which expert slot) and numpy gates;
for a Soft MoE block, from numpy combine weights.
"""

import keras
import numpy as np
import pytest

from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import expert_assignments
from keras_vmoe.models import router_inputs
from tests.helpers import moe_block_tokens
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy

NUM_EXPERTS = 4
BATCH = 4


def vmoe_backbone(seed=0, **overrides):
    """Two MoE blocks, 4 experts, a capacity small enough to drop tokens."""
    keras.utils.set_random_seed(seed)
    arguments = tiny_vit_arguments(
        moe_layers=(0, 1),
        num_experts=NUM_EXPERTS,
        capacity_factor=0.5,
        pooling="token",
        router_options=dict(capacity_multiple_of=None),
    )
    arguments.update(overrides)
    return VMoEBackbone(**arguments)


def np_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def holders_from_plan(dispatch_index, group_size):
    """(G, S, E) bool: token s of group g sits in some slot of expert e."""
    num_groups, num_experts, capacity = dispatch_index.shape
    holders = np.zeros((num_groups, group_size, num_experts), bool)
    for g in range(num_groups):
        for e in range(num_experts):
            for c in range(capacity):
                token = dispatch_index[g, e, c]
                if token < group_size:  # group_size marks an empty slot.
                    assert not holders[g, token, e], "a token sits twice in one expert"
                    holders[g, token, e] = True
    return holders


def expected_sparse_assignment(moe, tokens, plan):
    """(G, S): the highest-gated of a token's top-K experts that holds it in
    the plan, -1 when none does; checks that only top-K experts hold it."""
    tokens = to_numpy(tokens)
    gates = np_softmax(tokens.astype(np.float64) @ to_numpy(moe.router.kernel).astype(np.float64))
    k = moe.router.num_selected_experts
    ranking = np.argsort(-gates, axis=-1)[..., :k]  # (G, S, K), best first.
    holders = holders_from_plan(to_numpy(plan.dispatch_index), tokens.shape[1])
    expected = np.full(tokens.shape[:2], -1)
    for g in range(tokens.shape[0]):
        for s in range(tokens.shape[1]):
            held = set(np.flatnonzero(holders[g, s]))
            assert held <= set(ranking[g, s]), (g, s, held, ranking[g, s])
            for e in ranking[g, s]:
                if e in held:
                    expected[g, s] = e
                    break
    return expected


def test_router_inputs_are_the_tokens_each_router_sees():
    backbone = vmoe_backbone(group_size=34)
    images = random_images(BATCH)
    inputs = router_inputs(backbone, images)
    assert sorted(inputs) == [0, 1]
    for index, tokens in inputs.items():
        tokens = to_numpy(tokens)
        assert tokens.shape == (BATCH // 2, 34, 32)  # Groups of 2 images of 1 + 16 tokens.
        reference = to_numpy(moe_block_tokens(backbone, images, index))
        np.testing.assert_allclose(tokens, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "k, batch_priority, group_size",
    [
        (1, False, None),
        (1, True, None),
        (2, False, 34),  # A routing group spans 2 images of 1 + 16 tokens.
        (2, True, 34),
    ],
)
def test_sparse_assignments_follow_the_dispatch_plan(k, batch_priority, group_size):
    backbone = vmoe_backbone(num_selected_experts=k, batch_priority=batch_priority, group_size=group_size)
    images = random_images(BATCH, seed=3)
    tokens_per_image = 17  # The class token first, then 16 patches.
    assignments = expert_assignments(backbone, images)
    assert sorted(assignments) == [0, 1]
    total_dropped = 0
    for index, tokens in router_inputs(backbone, images).items():
        assignment = np.asarray(assignments[index])
        assert assignment.shape == (BATCH, tokens_per_image)
        assert assignment.dtype == np.int32
        assert assignment.min() >= -1 and assignment.max() < NUM_EXPERTS

        moe = backbone.get_layer(f"encoder_block_{index}").mlp
        plan, metrics = moe.router(tokens, training=False)
        expected = expected_sparse_assignment(moe, tokens, plan)
        # Groups are consecutive images: (G, S) reads back as (images, tokens).
        np.testing.assert_array_equal(assignment, expected.reshape(BATCH, tokens_per_image))

        group = tokens.shape[1]
        dropped = int(round(float(to_numpy(metrics["dropped_tokens"]).sum()) * group))
        assert (assignment == -1).sum() == dropped
        total_dropped += dropped

        # A dropped token gets nothing from the experts; a kept one does.
        per_image = keras.ops.reshape(tokens, (BATCH, tokens_per_image, -1))
        outputs = to_numpy(moe(per_image, training=False))
        norms = np.abs(outputs).sum(axis=-1)
        assert (norms[assignment == -1] == 0).all()
        assert (norms[assignment >= 0] > 0).all()
    # capacity_factor=0.5 leaves slots for half the choices: some tokens lose all of theirs.
    assert total_dropped > 0


def test_expert_choice_assignments_are_experts_that_took_the_token():
    backbone = vmoe_backbone(router="expert_choice", capacity_factor=1.0)
    images = random_images(BATCH, seed=4)
    assignments = expert_assignments(backbone, images)
    for index, tokens in router_inputs(backbone, images).items():
        assignment = assignments[index]
        moe = backbone.get_layer(f"encoder_block_{index}").mlp
        plan, metrics = moe.router(tokens, training=False)
        holders = holders_from_plan(to_numpy(plan.dispatch_index), 17)
        held = holders.any(axis=-1)  # Expert choice: a token no expert took is dropped.
        np.testing.assert_array_equal(assignment == -1, ~held)
        rows, columns = np.nonzero(held)
        assert holders[rows, columns, assignment[rows, columns]].all()
        dropped = to_numpy(metrics["dropped_tokens"]).sum() * 17
        assert (assignment == -1).sum() == int(round(float(dropped)))


# A functional model returns a lone output unwrapped: one MoE block.
def test_a_single_moe_block():
    backbone = vmoe_backbone(moe_layers=(1,))
    images = random_images(BATCH)
    (tokens,) = router_inputs(backbone, images).values()
    np.testing.assert_allclose(
        to_numpy(tokens), to_numpy(moe_block_tokens(backbone, images, 1)), atol=1e-5, rtol=1e-5
    )
    assert expert_assignments(backbone, images)[1].shape == (BATCH, 17)


def test_soft_moe_assignment_is_the_expert_with_the_largest_combine_share():
    keras.utils.set_random_seed(1)
    backbone = SoftMoEBackbone(
        **tiny_vit_arguments(moe_layers=(0, 1), num_experts=NUM_EXPERTS, slots_per_expert=3, pooling="token")
    )
    images = random_images(BATCH, seed=5)
    assignments = expert_assignments(backbone, images)
    assert sorted(assignments) == [0, 1]
    for index, tokens in router_inputs(backbone, images).items():
        router = backbone.get_layer(f"encoder_block_{index}").mlp.router
        x = to_numpy(tokens).astype(np.float64)
        x = x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)
        mu = to_numpy(router.mu).astype(np.float64)
        mu = mu / np.sqrt((mu**2).sum(0, keepdims=True) + 1e-6)
        logits = np.einsum("gsd,dep->gsep", x, mu) * float(to_numpy(router.scale))
        groups, size = logits.shape[:2]
        combine = np_softmax(logits.reshape(groups, size, -1)).reshape(logits.shape)
        share = combine.sum(-1)  # (G, S, E)
        assignment = assignments[index]
        assert assignment.shape == (BATCH, 17) and assignment.dtype == np.int32
        assert assignment.min() >= 0 and assignment.max() < NUM_EXPERTS
        np.testing.assert_array_equal(assignment, share.argmax(-1).reshape(BATCH, 17))


def test_a_backbone_without_moe_layers_has_no_assignments():
    keras.utils.set_random_seed(0)
    backbone = VMoEBackbone(**tiny_vit_arguments())
    images = random_images(2)
    assert router_inputs(backbone, images) == {}
    assert expert_assignments(backbone, images) == {}
