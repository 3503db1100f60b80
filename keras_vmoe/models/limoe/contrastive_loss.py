"""Contrastive image-text losses on a (images, texts) logit matrix whose
diagonal holds the matching pairs."""

from keras import ops

CONTRASTIVE_LOSSES = ("softmax", "sigmoid")


def softmax_contrastive_loss(logits):
    """CLIP's loss: the mean of image->text and text->image cross-entropies
    with the matching pair as the label. logits: (B, B) -> scalar."""
    logits = ops.cast(logits, "float32")
    labels = ops.arange(ops.shape(logits)[0])
    image_to_text = ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    text_to_image = ops.sparse_categorical_crossentropy(labels, ops.transpose(logits), from_logits=True)
    return (ops.mean(image_to_text) + ops.mean(text_to_image)) / 2.0


def sigmoid_contrastive_loss(logits):
    """SigLIP's loss: every (image, text) pair is a binary problem, positive
    on the diagonal; summed over texts, averaged over images (big_vision's
    normalisation). logits: (B, B) -> scalar."""
    logits = ops.cast(logits, "float32")
    signs = 2.0 * ops.eye(ops.shape(logits)[0], dtype="float32") - 1.0
    return -ops.mean(ops.sum(ops.log_sigmoid(signs * logits), axis=-1))


def contrastive_loss(logits, kind):
    if kind == "softmax":
        return softmax_contrastive_loss(logits)
    if kind == "sigmoid":
        return sigmoid_contrastive_loss(logits)
    raise ValueError(f"contrastive loss must be one of {CONTRASTIVE_LOSSES}, got {kind!r}.")
