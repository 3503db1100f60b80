"""What the evaluations read from a model: its inputs, their valid range,
logits and pre-logit features, computed in batches.

The zoo's image classifiers take preprocessed pixels when called (keras-hub's
convention); their preprocessor's image converter maps uint8 pixels to them
(`x * scale + offset`, vmoe's [-1, 1] for the bundled presets). Attacks work
in that input space, as vmoe's do.
"""

import keras
import numpy as np

from keras_vmoe.models.image_classifier import VisionTransformerImageClassifier


def batches(count, batch_size):
    """Slices of `range(count)` of at most `batch_size`."""
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def check_classifier(model, what):
    """Raises unless `model` is one of the zoo's image classifiers."""
    if not isinstance(model, VisionTransformerImageClassifier):
        raise ValueError(
            f"{what} needs an image classifier of the zoo (a VisionTransformerImageClassifier, "
            f"VMoEImageClassifier or SoftMoEImageClassifier, e.g. from_preset('vmoe_tiny_cifar10')); "
            f"got {type(model).__name__}."
        )


def image_converter(model):
    preprocessor = getattr(model, "preprocessor", None)
    return getattr(preprocessor, "image_converter", None)


def model_inputs(model, images, batch_size=256):
    """float32 model inputs: `images` (uint8 pixels, any size) through the
    model's image converter, or as given when it has none."""
    converter = image_converter(model)
    images = np.asarray(images)
    if converter is None:
        return images.astype("float32")
    parts = [keras.ops.convert_to_numpy(converter(images[part])) for part in batches(len(images), batch_size)]
    return np.concatenate(parts).astype("float32")


def input_range(model):
    """(low, high) of the model's inputs, broadcastable over channels: the
    image converter's image of the pixel range [0, 255]; None without one."""
    converter = image_converter(model)
    if converter is None:
        return None
    scale = np.asarray(1.0 if converter.scale is None else converter.scale, "float32")
    offset = np.asarray(0.0 if converter.offset is None else converter.offset, "float32")
    ends = np.stack([0.0 * scale + offset, 255.0 * scale + offset])
    return ends.min(axis=0), ends.max(axis=0)


def logits(model, inputs, batch_size=256):
    """(N, classes) float32 logits of a classifier on model inputs."""
    parts = [
        keras.ops.convert_to_numpy(model(inputs[part], training=False))
        for part in batches(len(inputs), batch_size)
    ]
    return np.concatenate(parts).astype("float32")


def feature_extractor(model):
    """The part of `model` that maps model inputs to pre-logit features: an
    image classifier's backbone (pooled, before the head), or a pooled
    backbone itself."""
    backbone = model.backbone if isinstance(model, VisionTransformerImageClassifier) else model
    if getattr(backbone, "pooling", None) is None or not hasattr(backbone, "moe_layers"):
        raise ValueError(
            f"{type(model).__name__} has no pre-logit features: few-shot and kNN evaluation need an "
            "image classifier of the zoo (its pooled backbone output, before the head) or a "
            "VisionTransformerBackbone-family backbone with pooling ('token', 'gap' or 'map')."
        )
    return backbone


def pre_logits(model, images, batch_size=256, verbose=False):
    """(N, D) float32 pre-logit features of raw `images` (through the model's
    image converter when it has one).

    Example:
    ```python
    classifier = keras_vmoe.models.VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
    features = pre_logits(classifier, images)  # (N, 192)
    ```
    """
    backbone = feature_extractor(model)
    images = np.asarray(images)
    parts = batches(len(images), batch_size)
    bar = keras.utils.Progbar(len(parts), unit_name="batch") if verbose else None
    features = []
    for part in parts:
        x = model_inputs(model, images[part], batch_size)
        features.append(keras.ops.convert_to_numpy(backbone(x, training=False)).astype("float32"))
        if bar:
            bar.add(1)
    return np.concatenate(features) if features else np.zeros((0, backbone.hidden_dim), "float32")


def class_probabilities(model, images, batch_size=256):
    """(N, classes) float64 softmax probabilities of a classifier on raw `images`."""
    check_classifier(model, "class_probabilities")
    scores = logits(model, model_inputs(model, images, batch_size), batch_size).astype(np.float64)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return scores / scores.sum(axis=1, keepdims=True)
