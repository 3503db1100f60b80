"""The encoder on packed sequences (NaViT, "Patch n' Pack"): several images of
their own resolution and aspect ratio share one sequence of L tokens.

A packed batch is three arrays (`keras_vmoe.layers.SequencePacker` makes
them):

    patches      (B, L, ph * pw * C)  float, each patch's pixels, row-major
                                     (patch row, patch column, channel)
    positions    (B, L, 2)            int, the patch's (row, column) in its
                                     image's grid; (-1, -1) for a class token
    segment_ids  (B, L)               int, 1..N for the images of a sequence,
                                     0 for padding

Everything here is a pure function of `segment_ids`; N (images per sequence)
and P (tokens per image) are static. An image's tokens attend only to each
other (`segment_attention_mask`), are pooled on their own (`segment_pool`),
and a MoE layer routes them as one group of their own (`image_groups`): so an
image's outputs do not depend on the images that share its sequence.
"""

import keras
from keras import ops

from keras_vmoe import ops as moe_ops
from keras_vmoe.validation import check_int


def segment_attention_mask(segment_ids):
    """(B, L) -> (B, L, L) bool, True where query and key are in the same
    image. Padding attends to padding (a row with no True would give NaN in
    some backends' fused attention); no real token sees another image."""
    return ops.equal(segment_ids[:, :, None], segment_ids[:, None, :])


def segment_one_hot(segment_ids, max_images, dtype="float32"):
    """(B, L) -> (B, L, N): column n is 1 on the tokens of image n + 1."""
    images = ops.arange(1, max_images + 1, dtype="int32")
    return ops.cast(ops.equal(ops.cast(segment_ids, "int32")[:, :, None], images), dtype)


def image_groups(segment_ids, max_images, max_image_tokens):
    """The gather and scatter indices that turn a packed (B, L, D) sequence
    into one routing group per image, (B * N, P, D), and back.

    Returns `gather` (B, N, P) int32, the token of image n's p-th slot (-1:
    an empty slot), and `scatter` (B, L) int32, each token's slot n * P + p
    in the (N * P) groups of its sequence (padding: 0, its output is masked),
    and `grouped` (B, L) bool, whether a token has a slot. Tokens keep their
    order within an image; segments need not be contiguous. Tokens beyond P
    of an image get no slot and a zero MoE output, like dropped tokens (the
    native-resolution preprocessors refuse images that would have them).
    """
    segment_ids = ops.cast(segment_ids, "int32")
    length = ops.shape(segment_ids)[1]
    # Stable order by segment: a token's rank within its image.
    order = ops.argsort(segment_ids * length + ops.arange(length, dtype="int32")[None], axis=-1)
    one_hot = segment_one_hot(segment_ids, max_images, "int32")  # (B, L, N)
    counts = ops.sum(one_hot, axis=1)  # (B, N)
    padding = ops.sum(ops.cast(ops.equal(segment_ids, 0), "int32"), axis=1, keepdims=True)
    starts = padding + ops.cumsum(counts, axis=1) - counts  # (B, N), into `order`
    slots = ops.arange(max_image_tokens, dtype="int32")
    sorted_index = starts[:, :, None] + slots[None, None]  # (B, N, P)
    valid = slots[None, None] < counts[:, :, None]
    flat = ops.reshape(ops.minimum(sorted_index, length - 1), (ops.shape(segment_ids)[0], -1))
    gather = ops.reshape(ops.take_along_axis(order, flat, axis=1), ops.shape(sorted_index))
    gather = ops.where(valid, gather, -1)
    # Each token's rank = its place in `order` minus its image's start.
    place = ops.argsort(order, axis=-1)
    image = ops.maximum(segment_ids - 1, 0)
    start = ops.take_along_axis(starts, image, axis=1)
    rank = place - start
    real = ops.logical_and(segment_ids > 0, rank < max_image_tokens)
    scatter = ops.where(real, image * max_image_tokens + rank, 0)
    return {"gather": ops.cast(gather, "int32"), "scatter": ops.cast(scatter, "int32"), "grouped": real}


def to_image_groups(tokens, groups):
    """(B, L, ...) -> (B * N, P, ...) and the (B * N, P) bool mask of filled
    slots (empty slots hold zeros)."""
    gather = groups["gather"]
    batch, max_images, max_image_tokens = ops.shape(gather)
    mask = gather >= 0
    index = ops.reshape(ops.maximum(gather, 0), (batch, -1))
    trailing = tuple(ops.shape(tokens)[2:])
    values = _take_tokens(tokens, index)
    values = values * ops.cast(ops.reshape(mask, (batch, -1) + (1,) * len(trailing)), values.dtype)
    shape = (batch * max_images, max_image_tokens)
    return ops.reshape(values, shape + trailing), ops.reshape(mask, shape)


def from_image_groups(values, groups, segment_ids):
    """The inverse of `to_image_groups`: (B * N, P, ...) -> (B, L, ...),
    zeros on padding and on tokens without a group slot."""
    batch = ops.shape(segment_ids)[0]
    trailing = tuple(ops.shape(values)[2:])
    values = ops.reshape(values, (batch, -1) + trailing)
    tokens = _take_tokens(values, groups["scatter"])
    real = ops.reshape(groups["grouped"], tuple(ops.shape(segment_ids)) + (1,) * len(trailing))
    return tokens * ops.cast(real, tokens.dtype)


def _take_tokens(values, index):
    """values (B, T, ...) at index (B, L) along axis 1 -> (B, L, ...)."""
    trailing = len(values.shape) - 2
    index = ops.reshape(index, tuple(ops.shape(index)) + (1,) * trailing)
    index = ops.broadcast_to(index, tuple(ops.shape(index)[:2]) + tuple(ops.shape(values)[2:]))
    return ops.take_along_axis(values, index, axis=1)


def segment_pool(tokens, segment_ids, max_images, mode, prefix_mask=None):
    """(B, L, D) -> (B, N, D), one vector per image slot (zeros for an empty
    one). `"gap"`: the mean of each image's patch tokens (not its class
    token); `"token"`: each image's first token (its class token)."""
    one_hot = segment_one_hot(segment_ids, max_images, tokens.dtype)  # (B, L, N)
    if mode == "token":
        weights = one_hot * ops.cast(ops.cumsum(one_hot, axis=1) == 1.0, tokens.dtype)
    else:
        weights = one_hot
        if prefix_mask is not None:
            weights = weights * (1.0 - ops.cast(prefix_mask, tokens.dtype))[:, :, None]
        weights = weights / ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1.0)
    return ops.einsum("bln,bld->bnd", weights, tokens)


def probe_attention_mask(segment_ids, max_images):
    """(B, L) -> (B, N, L) bool for per-image attention pooling: probe n
    attends to image n + 1's tokens; the probe of an empty slot attends to
    every token (its output is ignored; a row of False would be NaN)."""
    mask = ops.transpose(segment_one_hot(segment_ids, max_images, "int32"), (0, 2, 1)) > 0
    empty = ops.logical_not(ops.any(mask, axis=-1, keepdims=True))
    return ops.logical_or(mask, empty)


def image_extents(positions, segment_ids, max_images):
    """(B, L, 2) positions -> (B, L, 2) float: each token's image grid size
    (rows, columns), the largest position of its image plus one (token
    dropping keeps an image's last patch, so this is its whole grid)."""
    one_hot = segment_one_hot(segment_ids, max_images, "float32")  # (B, L, N)
    positions = ops.cast(positions, "float32")
    extents = moe_ops.amax(one_hot[:, :, :, None] * (positions[:, :, None, :] + 1.0), axis=1)  # (B, N, 2)
    return ops.einsum("bln,bnc->blc", one_hot, extents)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class PackedLayout(keras.layers.Layer):
    """What a packed encoder needs from `(positions, segment_ids)`, computed
    once: `prefix_mask` (B, L) bool (class tokens, at position (-1, -1)), and
    the `image_groups` indices that route one group per image.

    Args:
        max_images: N, image slots per sequence.
        max_image_tokens: P, the most tokens (prefix tokens included) one
            image may have: the size of its routing group.
    """

    def __init__(self, max_images, max_image_tokens, **kwargs):
        super().__init__(**kwargs)
        self.max_images = check_int("max_images", max_images, minimum=1, owner="PackedLayout")
        self.max_image_tokens = check_int(
            "max_image_tokens", max_image_tokens, minimum=1, owner="PackedLayout"
        )

    def call(self, positions, segment_ids):
        layout = image_groups(segment_ids, self.max_images, self.max_image_tokens)
        layout["prefix_mask"] = ops.logical_and(positions[:, :, 0] < 0, segment_ids > 0)
        return layout

    def get_config(self):
        config = super().get_config()
        config.update(max_images=self.max_images, max_image_tokens=self.max_image_tokens)
        return config
