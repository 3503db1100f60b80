"""A reliability diagram with Pillow: per confidence bin, the accuracy (bars)
against the mean confidence (the diagonal is perfect calibration).

Takes the bins of `keras_vmoe.evaluation.calibration.calibration_bins`.

Example:
>>> counts = np.array([0.0, 3.0, 5.0])
>>> confidence = np.array([np.nan, 0.5, 0.9])
>>> accuracy = np.array([np.nan, 0.33, 0.8])
>>> draw_reliability_diagram(counts, confidence, accuracy, "a model").size
(480, 480)
"""

import numpy as np
from PIL import Image
from PIL import ImageDraw

from keras_vmoe.visualization.routing_map import load_font


def draw_reliability_diagram(counts, mean_confidence, accuracy, title, size=(480, 480)):
    """Bars of accuracy per equal-width bin, the gap to each bin's mean
    confidence shaded red, the diagonal, and the ECE in the title line.

    Args:
        counts, mean_confidence, accuracy: per bin (empty bins: count 0).
        title: a line above the chart.

    Returns:
        A PIL image.
    """
    counts = np.asarray(counts, dtype="float64")
    mean_confidence = np.asarray(mean_confidence, dtype="float64")
    accuracy = np.asarray(accuracy, dtype="float64")
    if not counts.shape == mean_confidence.shape == accuracy.shape or counts.ndim != 1 or not counts.size:
        raise ValueError(
            "draw_reliability_diagram: counts, mean_confidence and accuracy must be equal 1-D arrays."
        )
    if counts.sum() <= 0:
        raise ValueError("draw_reliability_diagram: every bin is empty.")
    filled = counts > 0
    ece = float(np.sum(counts[filled] / counts.sum() * np.abs(accuracy[filled] - mean_confidence[filled])))
    width, height = size
    left, bottom, top, right = 60, 50, 50, 20
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font = load_font(13)

    def to_pixel(x, y):
        return left + (width - left - right) * x, height - bottom - (height - top - bottom) * y

    num_bins = counts.size
    for index in np.flatnonzero(filled):
        x0, _ = to_pixel(index / num_bins, 0)
        x1, y_bottom = to_pixel((index + 1) / num_bins, 0)
        _, y_accuracy = to_pixel(0, accuracy[index])
        _, y_confidence = to_pixel(0, mean_confidence[index])
        draw.rectangle((x0, y_accuracy, x1, y_bottom), fill=(70, 110, 200), outline="white")
        draw.rectangle(
            (x0, min(y_accuracy, y_confidence), x1, max(y_accuracy, y_confidence)), outline=(200, 40, 40)
        )
    draw.line((*to_pixel(0, 0), *to_pixel(1, 1)), fill="gray", width=1)
    draw.line((*to_pixel(0, 0), *to_pixel(1, 0)), fill="black")
    draw.line((*to_pixel(0, 0), *to_pixel(0, 1)), fill="black")
    for tick in np.linspace(0, 1, 6):
        x, y = to_pixel(tick, 0)
        draw.text((x - 10, y + 6), f"{tick:.1f}", fill="black", font=font)
        x, y = to_pixel(0, tick)
        draw.text((x - 32, y - 7), f"{tick:.1f}", fill="black", font=font)
    draw.text((left, height - 22), "confidence (top-1 probability)", fill="black", font=font)
    draw.text((8, 12), f"{title}: ECE {ece:.4f} ({num_bins} bins)", fill="black", font=font)
    line = f"{int(counts.sum())} examples; bars: accuracy per bin, red: gap to its confidence"
    draw.text((8, 28), line, fill="black", font=font)
    return canvas
