"""Copying a foreign Keras model's weights into ours, pair by pair.

A converter lists `(description, their variable, our variable)` pairs, found
by attribute access (layer names of keras-hub models change with the model's
name, so paths are not matched). `check_pairs` makes sure every weight on
both sides is mapped exactly once, and `assign_pairs` checks every size
before it assigns anything, so a failed conversion leaves nothing half done.
"""

import keras
import numpy as np

from keras_vmoe.errors import CheckpointError


def attention_pairs(description, theirs, ours):
    """Pairs of a `keras.layers.MultiHeadAttention` and our
    `MultiHeadDotProductAttention`: the same (D, heads, head_dim) and
    (heads, head_dim, D) kernels, with biases."""
    pairs = []
    for name, their_dense, our_dense in (
        ("query", theirs.query_dense, ours.query),
        ("key", theirs.key_dense, ours.key),
        ("value", theirs.value_dense, ours.value),
        ("output", theirs.output_dense, ours.out),
    ):
        pairs.append((f"{description} {name} kernel", their_dense.kernel, our_dense.kernel))
        pairs.append((f"{description} {name} bias", their_dense.bias, our_dense.bias))
    return pairs


def layer_norm_pairs(description, theirs, ours):
    return [
        (f"{description} scale", theirs.gamma, ours.gamma),
        (f"{description} bias", theirs.beta, ours.beta),
    ]


def dense_pairs(description, theirs, ours):
    return [
        (f"{description} kernel", theirs.kernel, ours.kernel),
        (f"{description} bias", theirs.bias, ours.bias),
    ]


def check_pairs(converter, pairs, source, target, skip=()):
    """Raises unless every weight of `source` (except the variables in
    `skip`) and of `target` appears in exactly one pair."""
    skipped = {id(variable) for variable in skip}
    for side, model, index in (("source", source, 1), ("converted", target, 2)):
        mapped = [id(pair[index]) for pair in pairs]
        known = set(mapped) | skipped
        unmapped = [weight.path for weight in model.weights if id(weight) not in known]
        if unmapped or len(set(mapped)) != len(mapped):
            raise CheckpointError(
                f"{converter}: weights of the {side} model without a counterpart: "
                f"{unmapped or 'some mapped twice'}."
            )


def assign_pairs(converter, pairs):
    """Assigns every pair (reshaped to our shape), after checking all sizes."""
    values = []
    for description, theirs, ours in pairs:
        value = keras.ops.convert_to_numpy(theirs)
        if value.size != int(np.prod(ours.shape)):
            raise CheckpointError(
                f"{converter}: {description} has shape {value.shape} in the source model "
                f"but {tuple(ours.shape)} in the converted one."
            )
        values.append(value.reshape(ours.shape).astype(ours.dtype))
    for (_, _, ours), value in zip(pairs, values):
        ours.assign(value)
