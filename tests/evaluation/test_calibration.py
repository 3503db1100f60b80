"""Uncertainty metrics against brute-force NumPy references, as Keras metrics
in `compile` on every backend, and the reliability diagram."""

import keras
import numpy as np
import pytest

from keras_vmoe.evaluation import BrierScore
from keras_vmoe.evaluation import ExpectedCalibrationError
from keras_vmoe.evaluation import NegativeLogLikelihood
from keras_vmoe.evaluation import brier_score
from keras_vmoe.evaluation import calibration_bins
from keras_vmoe.evaluation import expected_calibration_error
from keras_vmoe.evaluation import negative_log_likelihood
from keras_vmoe.visualization import draw_reliability_diagram
from tests.helpers import to_numpy


def random_case(seed, examples=200, classes=5):
    rng = np.random.RandomState(seed)
    logits = rng.normal(0, 2.0, (examples, classes)).astype("float32")
    labels = rng.randint(0, classes, examples)
    return labels, logits


def softmax(logits):
    logits = np.asarray(logits, "float64")
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def brute_force(labels, logits, num_bins=15):
    """The three metrics, one example at a time, from their definitions."""
    p = softmax(logits)
    nll = np.mean([-np.log(p[i, y]) for i, y in enumerate(labels)])
    brier = np.mean([sum((p[i, k] - (k == y)) ** 2 for k in range(p.shape[1])) for i, y in enumerate(labels)])
    ece = 0.0
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        members = [
            i
            for i in range(len(labels))
            if low <= p[i].max() < high or (b == num_bins - 1 and p[i].max() == 1)
        ]
        if members:
            accuracy = np.mean([p[i].argmax() == labels[i] for i in members])
            confidence = np.mean([p[i].max() for i in members])
            ece += len(members) / len(labels) * abs(accuracy - confidence)
    return nll, ece, brier


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_functions_match_the_definitions(seed):
    labels, logits = random_case(seed)
    nll, ece, brier = brute_force(labels, logits)
    assert negative_log_likelihood(labels, logits) == pytest.approx(nll, rel=1e-9)
    assert expected_calibration_error(labels, logits) == pytest.approx(ece, rel=1e-9, abs=1e-12)
    assert brier_score(labels, logits) == pytest.approx(brier, rel=1e-9)
    # Probabilities give the same figures as logits.
    probabilities = softmax(logits)
    assert brier_score(labels, probabilities, from_logits=False) == pytest.approx(brier, rel=1e-9)
    assert expected_calibration_error(labels, probabilities, 10, from_logits=False) == pytest.approx(
        brute_force(labels, logits, 10)[1], rel=1e-9, abs=1e-12
    )


def test_keras_metrics_accumulate_batches_and_match_the_functions():
    labels, logits = random_case(3)
    metrics = [NegativeLogLikelihood(), ExpectedCalibrationError(), BrierScore()]
    functions = [negative_log_likelihood, expected_calibration_error, brier_score]
    for metric in metrics:
        for start in range(0, len(labels), 64):  # Batches of 64, 64, 64, 8.
            metric.update_state(labels[start : start + 64], logits[start : start + 64])
    for metric, function in zip(metrics, functions):
        # float32 softmax and sums of 200 terms against float64.
        assert float(to_numpy(metric.result())) == pytest.approx(function(labels, logits), rel=1e-5, abs=1e-6)
        metric.reset_state()
        assert float(to_numpy(metric.result())) == 0.0
        clone = type(metric).from_config(metric.get_config())
        assert clone.get_config() == metric.get_config()


def test_metrics_in_compile_report_the_functions_values():
    labels, _ = random_case(4, examples=96)
    images = np.random.RandomState(4).normal(size=(96, 6)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5)])
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[NegativeLogLikelihood(), ExpectedCalibrationError(num_bins=10), BrierScore()],
    )
    results = model.evaluate(images, labels, batch_size=32, verbose=0, return_dict=True)
    logits = model.predict(images, verbose=0)
    assert results["nll"] == pytest.approx(negative_log_likelihood(labels, logits), rel=1e-5)
    assert results["nll"] == pytest.approx(results["loss"], rel=1e-5)
    assert results["ece"] == pytest.approx(expected_calibration_error(labels, logits, 10), rel=1e-4, abs=1e-6)
    assert results["brier_score"] == pytest.approx(brier_score(labels, logits), rel=1e-5)


def test_bad_input_is_named():
    labels, logits = random_case(5, examples=4)
    with pytest.raises(ValueError, match="labels must be class indices in"):
        brier_score(np.array([0, 1, 2, 9]), logits)
    with pytest.raises(ValueError, match="3 labels for 4 predictions"):
        negative_log_likelihood(labels[:3], logits)
    with pytest.raises(ValueError, match="num_bins must be an int >= 1"):
        ExpectedCalibrationError(num_bins=0)
    with pytest.raises(ValueError, match=r"must be \(examples, classes\)"):
        expected_calibration_error(labels, logits[0])


def test_reliability_diagram_is_drawn(tmp_path):
    labels, logits = random_case(6, examples=500)
    counts, confidence, accuracy = calibration_bins(labels, logits)
    assert counts.sum() == 500
    picture = draw_reliability_diagram(counts, confidence, accuracy, "random logits")
    assert picture.size == (480, 480)
    pixels = np.asarray(picture)
    assert (pixels[..., 2] > 150).any() and (pixels != 255).any()  # Blue bars were drawn.
    with pytest.raises(ValueError, match="every bin is empty"):
        draw_reliability_diagram(np.zeros(3), np.zeros(3), np.zeros(3), "none")
