"""The LIMoE expert-modality analysis against the routers' own dispatch tables."""

import keras
import numpy as np
import pytest

from keras_vmoe.models import LIMoEBackbone
from keras_vmoe.models.limoe.expert_modality import ExpertModalityStats
from keras_vmoe.models.limoe.expert_modality import expert_modality_counts
from keras_vmoe.models.limoe.expert_modality import routed_experts
from keras_vmoe.visualization.expert_modality import draw_expert_modality
from tests.helpers import random_images
from tests.helpers import to_numpy


def recorded_dispatch(backbone, monkeypatch):
    """Records, per MoE block, the dispatch table (G, E, C) of every router call."""
    tables = {index: [] for index in backbone.moe_layers}
    for index in backbone.moe_layers:
        router = backbone.blocks[index].mlp.router
        call = router.call

        def recording(*args, _call=call, _index=index, **kwargs):
            plan, metrics = _call(*args, **kwargs)
            tables[_index].append(to_numpy(plan.dispatch_index))
            return plan, metrics

        monkeypatch.setattr(router, "call", recording)
    return tables


def tiny_limoe(**overrides):
    """A 2-block LIMoE on 16x16 images (16 patches) and 8 text positions, 4 experts in both blocks."""
    arguments = dict(
        image_shape=(16, 16, 3),
        patch_size=4,
        vocabulary_size=50,
        max_text_length=8,
        num_layers=2,
        hidden_dim=16,
        mlp_dim=32,
        num_heads=2,
        embedding_dim=8,
        moe_layers=(0, 1),
        num_experts=4,
    )
    return LIMoEBackbone(**(arguments | overrides))


def test_counts_and_shares_match_the_dispatch_tables(monkeypatch):
    backbone = tiny_limoe(capacity_factor=0.5)  # Some tokens are dropped.
    images = random_images(6, (16, 16, 3))
    rng = np.random.default_rng(0)
    token_ids = rng.integers(4, 50, (5, 8)).astype("int32")
    lengths = np.array([8, 5, 3, 6, 2])
    padding_mask = np.arange(8)[None] < lengths[:, None]
    stats = expert_modality_counts(backbone, images, token_ids, padding_mask)
    assert sorted(stats) == [0, 1]

    # By hand: run each modality through the model's own forward pass and
    # count the filled slots of each expert (a slot holding token index S
    # is empty); what no slot holds was dropped.
    tables = recorded_dispatch(backbone, monkeypatch)
    backbone.embed_images(images)
    image_tables = {index: list(calls) for index, calls in tables.items()}
    for calls in tables.values():
        calls.clear()
    backbone.embed_text(token_ids, padding_mask)
    for index in (0, 1):
        counts = np.zeros((2, 4), int)
        for m, (calls, group_size, tokens) in enumerate(
            [(image_tables[index], 16, 6 * 16), (tables[index], 8, lengths.sum())]
        ):
            (table,) = calls  # (G, E, C)
            counts[m] = (table < group_size).sum(axis=(0, 2))
            assert stats[index].dropped[m] == tokens - counts[m].sum()
        np.testing.assert_array_equal(stats[index].counts, counts)
        assert stats[index].dropped[0] > 0  # Capacity 0.5 drops image tokens.
        distribution = counts / counts.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(stats[index].modality_distribution, distribution)
        np.testing.assert_allclose(stats[index].token_share, counts / counts.sum(axis=0))
        np.testing.assert_allclose(stats[index].balanced_share, distribution / distribution.sum(axis=0))


def test_shares_and_specific_experts_by_hand():
    # Expert 0: image only; 1: text only; 2: both; 3: nothing.
    stats = ExpertModalityStats(counts=np.array([[90, 0, 10, 0], [0, 5, 5, 0]]), dropped=np.array([20, 0]))
    np.testing.assert_allclose(stats.modality_distribution, [[0.9, 0, 0.1, 0], [0, 0.5, 0.5, 0]])
    # Expert 2 takes 10 image and 5 text tokens: 2/3 of its tokens are images,
    # but 10% of all images against 50% of all texts: 1/6 with both weighted equally.
    np.testing.assert_allclose(stats.token_share[:, :3], [[1, 0, 2 / 3], [0, 1, 1 / 3]])
    np.testing.assert_allclose(stats.balanced_share[:, :3], [[1, 0, 1 / 6], [0, 1, 5 / 6]])
    assert np.isnan(stats.balanced_share[:, 3]).all() and np.isnan(stats.token_share[:, 3]).all()
    np.testing.assert_allclose(stats.dropped_fraction, [20 / 120, 0])
    assert stats.specific_experts() == {"image": [0], "text": [1]}
    assert stats.specific_experts(threshold=0.8) == {"image": [0], "text": [1, 2]}
    picture = draw_expert_modality({3: stats, 5: stats}, title="by hand")
    assert picture.mode == "RGB" and picture.size[0] > picture.size[1] > 200
    with pytest.raises(ValueError, match="no MoE block"):
        draw_expert_modality({})
    with pytest.raises(ValueError, match="at least one image and one caption"):
        expert_modality_counts(None, np.zeros((0, 16, 16, 3)), np.zeros((2, 8), "int32"))


def test_routed_experts_decode_slots_with_the_capacity_of_a_routing_group():
    # group_size spans two images: slots are numbered with the capacity of a
    # 32-token group, not of one 16-token image (the decoding 0.1 got wrong).
    backbone = tiny_limoe(num_layers=1, moe_layers=(0,), num_selected_experts=2, group_size=32)
    images = random_images(4, (16, 16, 3))
    experts, _ = routed_experts(backbone, images=images)
    router = backbone.blocks[0].mlp.router
    assert router.capacity(32) != router.capacity(16)
    block = backbone.blocks[0]
    x, modalities, mask = backbone.input_tokens(images=images)
    tokens = block.router_tokens(block.attend(x, attention_mask=mask))
    plan, _ = router(tokens, token_modalities=keras.ops.reshape(modalities, (-1, 32)))
    capacity = router.capacity(32)
    slots = to_numpy(plan.combine_index).reshape(4, 16, 2)
    expected = np.where(slots < 4 * capacity, slots // capacity, -1)
    np.testing.assert_array_equal(experts[0], expected)
    assert (expected >= 0).any()


def test_modality_expert_pools_keep_images_and_text_apart():
    backbone = tiny_limoe(
        num_selected_experts=2,  # Both experts of a pool: nothing but the pools keeps them apart.
        capacity_factor=2.0,
        modality_expert_pools=True,
    )
    router = backbone.blocks[0].mlp.router
    assert router.expert_partitions == 2
    # A group of one modality gets room for all its tokens in its pool's 2 experts.
    assert router.capacity(16) == 32
    images = random_images(6, (16, 16, 3))
    rng = np.random.default_rng(0)
    token_ids = rng.integers(4, 50, (6, 8)).astype("int32")
    padding_mask = np.arange(8)[None] < np.array([8, 5, 3, 6, 2, 7])[:, None]
    stats = expert_modality_counts(backbone, images, token_ids, padding_mask)
    for index in (0, 1):
        counts = stats[index].counts  # (modality, expert)
        assert (counts[0, 2:] == 0).all() and (counts[1, :2] == 0).all(), counts
        # K = 2 and nothing dropped: every token twice.
        assert counts[0].sum() == 2 * 6 * 16 and counts[1].sum() == 2 * padding_mask.sum()
    # Pairs in one routing group (route_pairs_together): the gates of every token, per pool.
    x, modalities, mask = backbone.input_tokens(images[:2], token_ids[:2], padding_mask[:2])
    block = backbone.blocks[0]
    tokens = block.router_tokens(block.attend(x, attention_mask=mask))
    groups = keras.ops.reshape(modalities, (-1, tokens.shape[1]))
    gates = to_numpy(router.route_gates(tokens, False, None, groups)[0])
    groups = to_numpy(groups)
    assert (gates[groups == 0][:, 2:] == 0).all() and (gates[groups == 1][:, :2] == 0).all()
    np.testing.assert_allclose(gates[groups >= 0].sum(-1), 1.0, rtol=1e-5)
    # Training: the per-pool losses are finite (an image-only group has an empty text pool).
    outputs = backbone(
        {"images": images, "token_ids": token_ids, "padding_mask": padding_mask}, training=True
    )
    assert np.isfinite(to_numpy(outputs["image_embeddings"])).all()
    losses = [float(to_numpy(loss)) for loss in backbone.losses]
    assert losses and all(np.isfinite(losses)) and min(losses) > 0, losses
    config = backbone.get_config()
    assert config["modality_expert_pools"] is True
    assert LIMoEBackbone.from_config(config).blocks[1].mlp.router.modality_expert_pools


def test_modality_expert_pools_bad_input():
    with pytest.raises(ValueError, match="num_experts must be even, got 5"):
        tiny_limoe(num_experts=5, modality_expert_pools=True)
    from keras_vmoe.layers import MultimodalTokenChoiceRouter

    with pytest.raises(ValueError, match="expert_partitions must be 2, got 4"):
        MultimodalTokenChoiceRouter(8, modality_expert_pools=True, expert_partitions=4)
    with pytest.raises(ValueError, match="not expert_partitions"):
        MultimodalTokenChoiceRouter(8, expert_partitions=2)
    router = MultimodalTokenChoiceRouter(4, modality_expert_pools=True)
    with pytest.raises(ValueError, match="call it with `token_modalities`"):
        router(keras.ops.ones((1, 4, 8)))
