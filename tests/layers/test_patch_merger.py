"""PatchMerger: the paper's equation, convex combinations, class token, errors, config."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import PatchMerger
from tests.helpers import gradients
from tests.helpers import to_numpy


def random_tokens(batch=2, length=16, dim=8, seed=0):
    rng = np.random.RandomState(seed)
    # Per-token offsets and scales, so the LayerNorm has work to do.
    return (
        rng.normal(size=(batch, length, dim)) * rng.uniform(0.5, 3, (batch, length, 1))
        + rng.normal(size=(batch, length, 1))
    ).astype("float32")


def built_merger(num_tokens=4, num_prefix_tokens=0, length=16, dim=8, seed=1):
    """A merger with random (non-default) LayerNorm parameters."""
    merger = PatchMerger(num_tokens, num_prefix_tokens=num_prefix_tokens)
    merger.build((None, length, dim))
    rng = np.random.RandomState(seed)
    merger.norm.gamma.assign(rng.uniform(0.5, 1.5, dim).astype("float32"))
    merger.norm.beta.assign(rng.normal(0, 0.1, dim).astype("float32"))
    return merger


def numpy_patch_merger(tokens, kernel, gamma, beta, epsilon=1e-6):
    """The paper's Y = softmax(W^T X^T) X, X the LayerNorm-ed tokens."""
    mean = tokens.mean(-1, keepdims=True)
    variance = tokens.var(-1, keepdims=True)
    x = (tokens - mean) / np.sqrt(variance + epsilon) * gamma + beta
    scores = np.einsum("bnd,dm->bmn", x, kernel)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bmn,bnd->bmd", weights, x), weights, x


@pytest.mark.parametrize("num_tokens,length", [(1, 16), (4, 16), (16, 16), (3, 7)])
def test_output_shape(num_tokens, length):
    merger = PatchMerger(num_tokens)
    assert tuple(merger(random_tokens(length=length)).shape) == (2, num_tokens, 8)
    assert merger.compute_output_shape((None, length, 8)) == (None, num_tokens, 8)
    assert tuple(merger.kernel.shape) == (8, num_tokens)


def test_matches_the_paper_equation_in_numpy():
    merger = built_merger()
    tokens = random_tokens()
    expected, expected_weights, _ = numpy_patch_merger(
        tokens, to_numpy(merger.kernel), to_numpy(merger.norm.gamma), to_numpy(merger.norm.beta)
    )
    np.testing.assert_allclose(to_numpy(merger(tokens)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(merger.merge_weights(tokens)), expected_weights, rtol=1e-5, atol=1e-6)


def test_merged_tokens_are_convex_combinations_of_the_normalised_tokens():
    merger = built_merger(num_tokens=5)
    # Larger scores: peaked softmax rows, a harder case for the invariants.
    merger.kernel.assign(4.0 * to_numpy(merger.kernel))
    tokens = random_tokens(batch=3, seed=2)
    weights = to_numpy(merger.merge_weights(tokens))
    assert weights.shape == (3, 5, 16)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)
    merged = to_numpy(merger(tokens))
    normalized = to_numpy(merger.norm(tokens))
    np.testing.assert_allclose(merged, np.einsum("bmn,bnd->bmd", weights, normalized), atol=1e-5)
    # Inside the convex hull: every feature between the inputs' min and max.
    low, high = normalized.min(axis=1, keepdims=True), normalized.max(axis=1, keepdims=True)
    assert np.all(merged >= low - 1e-5) and np.all(merged <= high + 1e-5)


def test_identical_tokens_merge_to_that_token():
    merger = built_merger()
    token = random_tokens(batch=1, length=1)
    tokens = np.repeat(token, 16, axis=1)
    expected = np.repeat(to_numpy(merger.norm(token)), 4, axis=1)
    np.testing.assert_allclose(to_numpy(merger(tokens)), expected, rtol=1e-5, atol=1e-5)


def test_output_does_not_depend_on_the_token_order():
    merger = built_merger()
    tokens = random_tokens()
    shuffled = tokens[:, np.random.RandomState(3).permutation(16)]
    np.testing.assert_allclose(to_numpy(merger(shuffled)), to_numpy(merger(tokens)), rtol=1e-5, atol=1e-5)


def test_images_are_merged_independently():
    merger = built_merger()
    tokens = random_tokens(batch=3)
    alone = to_numpy(merger(tokens[1:2]))
    np.testing.assert_allclose(to_numpy(merger(tokens))[1:2], alone, rtol=1e-5, atol=1e-5)


def test_prefix_tokens_pass_through_unmerged():
    merger = built_merger(num_tokens=4, num_prefix_tokens=1, length=17)
    tokens = random_tokens(length=17)
    outputs = to_numpy(merger(tokens))
    assert outputs.shape == (2, 5, 8)
    np.testing.assert_array_equal(outputs[:, 0], tokens[:, 0])
    expected, _, _ = numpy_patch_merger(
        tokens[:, 1:], to_numpy(merger.kernel), to_numpy(merger.norm.gamma), to_numpy(merger.norm.beta)
    )
    np.testing.assert_allclose(outputs[:, 1:], expected, rtol=1e-5, atol=1e-5)
    # The class token does not take part in the merge.
    changed = tokens.copy()
    changed[:, 0] += 10.0
    np.testing.assert_allclose(to_numpy(merger(changed))[:, 1:], outputs[:, 1:], atol=1e-6)
    assert merger.compute_output_shape((None, 17, 8)) == (None, 5, 8)


def test_gradients_reach_the_queries_the_norm_and_every_input_token():
    merger = built_merger(num_tokens=3, num_prefix_tokens=1, length=17)
    tokens = random_tokens(length=17)
    weight_grads, input_grad = gradients(merger, tokens)
    assert sorted(v.path.split("/")[-1] for v in merger.trainable_variables) == ["beta", "gamma", "kernel"]
    for grad, variable in zip(weight_grads, merger.trainable_variables):
        assert grad is not None and grad.shape == tuple(variable.shape)
        assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0, variable.path
    assert input_grad.shape == tokens.shape and np.all(np.isfinite(input_grad))
    assert np.all(np.abs(input_grad).max(axis=-1) > 0)  # every token, the class token too


def test_gradient_of_the_queries_matches_finite_differences():
    merger = built_merger(num_tokens=2, length=6, dim=4)
    tokens = random_tokens(length=6, dim=4)
    weight_grads, _ = gradients(merger, tokens, seed=5)
    (kernel_grad,) = [g for g, v in zip(weight_grads, merger.trainable_variables) if v is merger.kernel]
    cotangent = np.random.RandomState(5).normal(size=(2, 2, 4)).astype("float32")
    kernel = to_numpy(merger.kernel).astype("float64")
    gamma, beta = to_numpy(merger.norm.gamma), to_numpy(merger.norm.beta)

    def loss(k):
        merged, _, _ = numpy_patch_merger(tokens.astype("float64"), k, gamma, beta)
        return (merged * cotangent).sum()

    numeric = np.zeros_like(kernel)
    for index in np.ndindex(*kernel.shape):
        step = np.zeros_like(kernel)
        step[index] = 1e-5
        numeric[index] = (loss(kernel + step) - loss(kernel - step)) / 2e-5
    np.testing.assert_allclose(kernel_grad, numeric, rtol=1e-3, atol=1e-4)


def test_mixed_bfloat16_merges_with_float32_weights():
    merger = PatchMerger(4, dtype="mixed_bfloat16")
    tokens = keras.ops.cast(random_tokens(), "bfloat16")
    outputs = merger(tokens)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(merger.kernel.dtype) == "float32"
    weights = merger.merge_weights(tokens)
    assert keras.backend.standardize_dtype(weights.dtype) == "float32"
    np.testing.assert_allclose(to_numpy(weights).astype(np.float64).sum(-1), 1.0, atol=1e-6)
    reference = PatchMerger(4)
    reference.build((None, 16, 8))
    reference.set_weights(merger.get_weights())
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(outputs, "float32")), to_numpy(reference(random_tokens())), atol=0.1
    )


@pytest.mark.parametrize(
    "arguments,message",
    [
        (dict(num_tokens=0), "num_tokens` must be >= 1, got 0"),
        (dict(num_tokens=-2), "num_tokens` must be >= 1"),
        (dict(num_tokens=2.5), "num_tokens` must be an integer"),
        (dict(num_tokens="8"), "num_tokens` must be an integer"),
        (dict(num_tokens=2, num_prefix_tokens=-1), "num_prefix_tokens` must be >= 0"),
    ],
)
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        PatchMerger(**arguments)


def test_more_tokens_out_than_in_is_an_error():
    with pytest.raises(ValueError, match="num_tokens=17 is more than the 16 tokens it merges"):
        PatchMerger(17)(random_tokens())
    with pytest.raises(ValueError, match="16 tokens it merges \\(1 prefix token"):
        PatchMerger(17, num_prefix_tokens=1).build((None, 17, 8))
    merger = PatchMerger(8)
    merger(random_tokens())
    with pytest.raises(ValueError, match="more than the 4 tokens"):
        merger(random_tokens(length=4))
    with pytest.raises(ValueError, match="batch, tokens, dim"):
        PatchMerger(2).build((None, 8))


def test_config_round_trip_keeps_the_outputs():
    merger = built_merger(num_tokens=3, num_prefix_tokens=1, length=17)
    config = merger.get_config()
    assert (config["num_tokens"], config["num_prefix_tokens"]) == (3, 1)
    clone = PatchMerger.from_config(config)
    clone.build((None, 17, 8))
    clone.set_weights(merger.get_weights())
    tokens = random_tokens(length=17)
    np.testing.assert_array_equal(to_numpy(clone(tokens)), to_numpy(merger(tokens)))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(merger))
    assert type(restored) is PatchMerger and restored.get_config() == config
