"""Inference routing is deterministic; training noise is reproducible from a seed."""

import numpy as np
import pytest

from keras_vmoe.layers import SoftMoE
from keras_vmoe.layers import SparseMoE
from tests.helpers import to_numpy

LAYERS = {
    "token_choice": lambda seed: SparseMoE(4, 16, num_selected_experts=2, capacity_factor=0.75, seed=seed),
    "expert_choice": lambda seed: SparseMoE(4, 16, router="expert_choice", noise_std=1.0, seed=seed),
    "soft": lambda seed: SoftMoE(4, 16, slots_per_expert=2, noise_std=1.0, seed=seed),
}


def same_weights(layer, reference):
    layer.build((None, 8, 8))
    layer.set_weights(reference.get_weights())
    return layer


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_inference_is_deterministic_and_training_noise_follows_the_seed(kind):
    tokens = np.random.RandomState(0).randn(4, 8, 8).astype("float32")
    first = LAYERS[kind](seed=7)
    first.build((None, 8, 8))
    twin = same_weights(LAYERS[kind](seed=7), first)
    other = same_weights(LAYERS[kind](seed=8), first)
    inference = to_numpy(first(tokens, training=False))
    np.testing.assert_array_equal(to_numpy(first(tokens, training=False)), inference)
    np.testing.assert_array_equal(to_numpy(other(tokens, training=False)), inference)
    # The same seed draws the same noise, call after call; another seed does not.
    for _ in range(2):
        noisy = to_numpy(first(tokens, training=True))
        np.testing.assert_array_equal(to_numpy(twin(tokens, training=True)), noisy)
        assert not np.allclose(to_numpy(other(tokens, training=True)), noisy)
    assert not np.allclose(noisy, inference)
