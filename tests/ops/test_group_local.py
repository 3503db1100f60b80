"""Group-local ops (the expert-parallel path) against the generic reference."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers.routing_plans import scatter_table as _scatter_table
from keras_vmoe.ops import generic
from keras_vmoe.ops import group_local
from tests.helpers import to_numpy
from tests.ops.test_ops import D
from tests.ops.test_ops import E
from tests.ops.test_ops import G
from tests.ops.test_ops import S
from tests.ops.test_ops import gradients
from tests.ops.test_ops import routing_plan


def expert_major(slots):
    """(G, E, C, D) -> (E, G * C, D), the generic ops' layout."""
    num_groups, num_experts, capacity, dim = slots.shape
    return np.transpose(slots, (1, 0, 2, 3)).reshape(num_experts, num_groups * capacity, dim)


@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
def test_dispatch_and_combine_equal_the_reference(capacity_factor):
    dispatch_index, combine_index, combine_weights = routing_plan(capacity_factor)
    rng = np.random.RandomState(1)
    tokens = rng.randn(G, S, D).astype("float32")
    capacity = dispatch_index.shape[-1]
    slots = to_numpy(group_local.dispatch(tokens, dispatch_index))
    assert slots.shape == (G, E, capacity, D)
    np.testing.assert_array_equal(expert_major(slots), to_numpy(generic.dispatch(tokens, dispatch_index)))

    outputs = rng.randn(G, E, capacity, D).astype("float32")
    expected = generic.combine(expert_major(outputs), combine_index, combine_weights)
    got = group_local.combine(outputs, combine_index, combine_weights)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-6, atol=1e-6)

    # Gradients, with the backend's autodiff, through dispatch then combine.
    def group_local_moe(x, w):
        return group_local.combine(group_local.dispatch(x, dispatch_index) * 2.0, combine_index, w)

    def generic_moe(x, w):
        return generic.combine(generic.dispatch(x, dispatch_index) * 2.0, combine_index, w)

    for got, expected in zip(
        gradients(group_local_moe, (tokens, combine_weights)),
        gradients(generic_moe, (tokens, combine_weights)),
    ):
        np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-5, atol=1e-5)


def test_soft_dispatch_and_combine_equal_the_reference():
    rng = np.random.RandomState(2)
    tokens = rng.randn(G, S, D).astype("float32")
    dispatch_weights = rng.rand(G, S, E, 2).astype("float32")
    combine_weights = rng.rand(G, S, E, 2).astype("float32")
    slots = to_numpy(group_local.soft_dispatch(tokens, dispatch_weights))
    np.testing.assert_allclose(
        expert_major(slots), to_numpy(generic.soft_dispatch(tokens, dispatch_weights)), rtol=1e-5, atol=1e-5
    )
    outputs = rng.randn(G, E, 2, D).astype("float32")
    np.testing.assert_allclose(
        to_numpy(group_local.soft_combine(outputs, combine_weights)),
        to_numpy(generic.soft_combine(expert_major(outputs), combine_weights)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_top_k_equals_ops_top_k_and_breaks_ties_by_lower_index():
    x = np.random.RandomState(3).rand(G, S, E).astype("float32")  # No ties.
    for k in (1, 2, E):
        values, indices = group_local.top_k(x, k)
        expected_values, expected_indices = keras.ops.top_k(x, k)
        np.testing.assert_array_equal(to_numpy(values), to_numpy(expected_values))
        np.testing.assert_array_equal(to_numpy(indices), to_numpy(expected_indices))
    # Ties: the lower index first, as XLA's and TensorFlow's top_k (PyTorch
    # leaves their order unspecified).
    tied = np.array([[0.5, 0.5, 0.5, 0.5], [0.1, 2.0, 0.3, 2.0]], "float32")
    np.testing.assert_array_equal(to_numpy(group_local.top_k(tied, 2)[1]), [[0, 1], [1, 3]])


def test_scatter_table_equals_the_routers_flat_scatter():
    rng = np.random.RandomState(4)
    table_size, n = 10, 6
    # Distinct destinations per group below table_size; repeats of the scratch entry.
    destinations = np.stack([rng.permutation(table_size + 1)[:n] for _ in range(G)]).astype("int32")
    destinations[:, -2:] = table_size
    values = rng.randint(0, 50, (G, n)).astype("int32")
    expected = to_numpy(
        _scatter_table(
            keras.ops.convert_to_tensor(destinations), keras.ops.convert_to_tensor(values), G, table_size
        )
    )
    got = to_numpy(group_local.scatter_table(destinations, values, table_size))
    np.testing.assert_array_equal(got, expected)
    assert (expected >= 0).sum() == G * (n - 2)
