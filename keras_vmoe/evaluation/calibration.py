"""Uncertainty metrics: negative log-likelihood, expected calibration error
and Brier score, as NumPy functions and as Keras metrics for `compile`.

Definitions (those of uncertainty-baselines / robustness_metrics, which the
E³ paper's evaluations use), for N examples with class probabilities p:
- NLL: mean of -log p[label], computed from log-probabilities when given
  logits (no clipping).
- ECE: the top-1 confidences c = max p fall into `num_bins` equal-width bins
  of [0, 1] (bin min(floor(c * num_bins), num_bins - 1)); ECE is the sum over
  bins of (n_b / N) * |accuracy_b - mean confidence_b|. 15 bins by default.
- Brier score: mean over examples of sum over classes of (p - one_hot)^2, in
  [0, 2].

The metrics take sparse integer labels and, by default, logits (what the
zoo's classifiers return); `from_logits=False` takes probabilities.

Example:
>>> logits = np.array([[2.0, 0.0], [0.0, 1.0]])
>>> round(expected_calibration_error([0, 0], logits), 4)
0.4251
>>> metric = ExpectedCalibrationError()
>>> metric.update_state(np.array([0, 0]), logits)
>>> round(float(metric.result()), 4)
0.4251
"""

import keras
import numpy as np
from keras import ops

DEFAULT_NUM_BINS = 15


def _probabilities(predictions, from_logits):
    predictions = np.asarray(predictions, dtype="float64")
    if predictions.ndim != 2:
        raise ValueError(f"predictions must be (examples, classes), got shape {predictions.shape}.")
    if from_logits:
        shifted = predictions - predictions.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return np.exp(log_probabilities), log_probabilities
    return predictions, np.log(predictions)


def _labels(labels, predictions):
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != predictions.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {predictions.shape[0]} predictions.")
    if labels.size and (labels.min() < 0 or labels.max() >= predictions.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {predictions.shape[1]}).")
    return labels.astype("int64")


def negative_log_likelihood(labels, predictions, from_logits=True):
    """Mean -log p[label] (see the module docstring)."""
    _, log_probabilities = _probabilities(predictions, from_logits)
    labels = _labels(labels, log_probabilities)
    return float(-np.mean(log_probabilities[np.arange(len(labels)), labels]))


def calibration_bins(labels, predictions, num_bins=DEFAULT_NUM_BINS, from_logits=True):
    """Per bin: (count, mean confidence, accuracy); empty bins hold NaN means."""
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}.")
    probabilities, _ = _probabilities(predictions, from_logits)
    labels = _labels(labels, probabilities)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype("float64")
    bins = np.minimum(np.floor(confidence * num_bins).astype("int64"), num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins).astype("float64")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, confidence, minlength=num_bins) / counts
        accuracy = np.bincount(bins, correct, minlength=num_bins) / counts
    return counts, mean_confidence, accuracy


def expected_calibration_error(labels, predictions, num_bins=DEFAULT_NUM_BINS, from_logits=True):
    """ECE over `num_bins` equal-width confidence bins (see the module docstring)."""
    counts, mean_confidence, accuracy = calibration_bins(labels, predictions, num_bins, from_logits)
    filled = counts > 0
    return float(np.sum(counts[filled] / counts.sum() * np.abs(accuracy[filled] - mean_confidence[filled])))


def brier_score(labels, predictions, from_logits=True):
    """Mean over examples of sum over classes of (p - one_hot(label))^2."""
    probabilities, _ = _probabilities(predictions, from_logits)
    labels = _labels(labels, probabilities)
    one_hot = np.eye(probabilities.shape[1])[labels]
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def _sparse_labels(y_true):
    return ops.cast(ops.reshape(y_true, (-1,)), "int32")


def _log_probabilities(y_pred, from_logits):
    y_pred = ops.cast(y_pred, "float32")
    return ops.log_softmax(y_pred, axis=-1) if from_logits else ops.log(y_pred)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class NegativeLogLikelihood(keras.metrics.Mean):
    """Mean -log p[label] over the examples seen (sparse labels)."""

    def __init__(self, from_logits=True, name="nll", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.from_logits = from_logits

    def update_state(self, y_true, y_pred, sample_weight=None):
        log_probabilities = _log_probabilities(y_pred, self.from_logits)
        labels = ops.one_hot(_sparse_labels(y_true), ops.shape(log_probabilities)[-1])
        return super().update_state(-ops.sum(labels * log_probabilities, axis=-1), sample_weight)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="keras_vmoe")
class BrierScore(keras.metrics.Mean):
    """Mean over the examples seen of sum over classes of (p - one_hot)^2."""

    def __init__(self, from_logits=True, name="brier_score", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.from_logits = from_logits

    def update_state(self, y_true, y_pred, sample_weight=None):
        probabilities = ops.exp(_log_probabilities(y_pred, self.from_logits))
        labels = ops.one_hot(_sparse_labels(y_true), ops.shape(probabilities)[-1])
        return super().update_state(ops.sum((probabilities - labels) ** 2, axis=-1), sample_weight)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ExpectedCalibrationError(keras.metrics.Metric):
    """ECE over `num_bins` equal-width bins, accumulated exactly over batches
    (per bin: examples, summed confidence, summed correctness)."""

    def __init__(self, num_bins=DEFAULT_NUM_BINS, from_logits=True, name="ece", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"ExpectedCalibrationError: num_bins must be an int >= 1, got {num_bins!r}.")
        self.num_bins = num_bins
        self.from_logits = from_logits
        self.counts, self.confidence, self.correct = (
            self.add_variable(shape=(num_bins,), initializer="zeros", name=name)
            for name in ("counts", "confidence", "correct")
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        probabilities = ops.exp(_log_probabilities(y_pred, self.from_logits))
        confidence = ops.max(probabilities, axis=-1)
        correct = ops.cast(ops.argmax(probabilities, axis=-1) == _sparse_labels(y_true), "float32")
        bins = ops.minimum(ops.cast(ops.floor(confidence * self.num_bins), "int32"), self.num_bins - 1)
        weights = ops.one_hot(bins, self.num_bins)  # (examples, bins)
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1))
        self.counts.assign_add(ops.sum(weights, axis=0))
        self.confidence.assign_add(ops.sum(weights * confidence[:, None], axis=0))
        self.correct.assign_add(ops.sum(weights * correct[:, None], axis=0))

    def result(self):
        total = ops.maximum(ops.sum(self.counts.value), 1e-12)
        return ops.sum(ops.abs(self.correct.value - self.confidence.value)) / total

    def reset_state(self):
        for variable in (self.counts, self.confidence, self.correct):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self):
        return {**super().get_config(), "num_bins": self.num_bins, "from_logits": self.from_logits}
