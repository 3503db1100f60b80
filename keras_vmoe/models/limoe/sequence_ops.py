"""The LIMoE towers' pooling and embedding helpers."""

from keras import ops

from keras_vmoe.layers.normalization import l2_normalize


def masked_mean(tokens, mask):
    """(B, T, D) tokens, (B, T) bool mask -> (B, D) mean of the masked-in tokens."""
    weights = ops.cast(mask, tokens.dtype)[..., None]
    return ops.sum(tokens * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)


def normalized_embedding(x):
    """The towers' unit-norm embeddings, in float32 (big_vision's epsilon rule)."""
    return l2_normalize(ops.cast(x, "float32"), epsilon=1e-12, epsilon_rule="max")


def pad_to_length(x, length):
    """(..., L) with L <= `length` unknown until run time -> (-1, length),
    zero-padded, the leading axes flattened."""
    padded = ops.concatenate([x, ops.repeat(ops.zeros_like(x[..., :1]), length, axis=-1)], axis=-1)
    return ops.reshape(padded[..., :length], (-1, length))
