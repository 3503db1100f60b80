"""Contrastive image-text losses on a (images, texts) logit matrix whose
diagonal holds the matching pairs.

`mask` (B,) bool, optional, marks the pairs that exist (a packed
native-resolution batch has empty image slots): the loss is then exactly the
loss of the sub-matrix of those pairs."""

from keras import ops

CONTRASTIVE_LOSSES = ("softmax", "sigmoid")


def _pair_weights(logits, mask):
    """(B,) float32 weights of the pairs that count, and their number."""
    if mask is None:
        weights = ops.ones(ops.shape(logits)[:1], "float32")
    else:
        weights = ops.cast(mask, "float32")
    return weights, ops.maximum(ops.sum(weights), 1.0)


def softmax_contrastive_loss(logits, mask=None):
    """CLIP's loss: the mean of image->text and text->image cross-entropies
    with the matching pair as the label. logits: (B, B) -> scalar."""
    logits = ops.cast(logits, "float32")
    labels = ops.arange(ops.shape(logits)[0])
    weights, count = _pair_weights(logits, mask)
    transposed = ops.transpose(logits)
    if mask is not None:  # Absent pairs are no candidates: their columns drop out.
        absent = ops.logical_not(ops.cast(mask, "bool"))[None, :]
        logits, transposed = ops.where(absent, -1e9, logits), ops.where(absent, -1e9, transposed)
    image_to_text = ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    text_to_image = ops.sparse_categorical_crossentropy(labels, transposed, from_logits=True)
    return (ops.sum(image_to_text * weights) + ops.sum(text_to_image * weights)) / (2.0 * count)


def sigmoid_contrastive_loss(logits, mask=None):
    """SigLIP's loss: every (image, text) pair is a binary problem, positive
    on the diagonal; summed over texts, averaged over images (big_vision's
    normalisation). logits: (B, B) -> scalar."""
    logits = ops.cast(logits, "float32")
    weights, count = _pair_weights(logits, mask)
    signs = 2.0 * ops.eye(ops.shape(logits)[0], dtype="float32") - 1.0
    terms = ops.log_sigmoid(signs * logits) * weights[None, :] * weights[:, None]
    return -ops.sum(terms) / count


def contrastive_loss(logits, kind, mask=None):
    if kind == "softmax":
        return softmax_contrastive_loss(logits, mask)
    if kind == "sigmoid":
        return sigmoid_contrastive_loss(logits, mask)
    raise ValueError(f"contrastive loss must be one of {CONTRASTIVE_LOSSES}, got {kind!r}.")
