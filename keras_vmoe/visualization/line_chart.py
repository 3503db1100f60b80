"""A plain line chart with Pillow: one line per series, points marked, a legend.

The evaluations (accuracy against epsilon, few-shot accuracy against shots)
and the benchmarks draw with it; the zoo has no plotting dependency.

Example:
>>> chart = draw_line_chart({"vmoe": [(0, 0.9), (1, 0.5)]}, "epsilon", "accuracy", "PGD")
>>> chart.size
(640, 420)
"""

import math

from PIL import Image
from PIL import ImageDraw

from keras_vmoe.visualization.routing_map import PALETTE
from keras_vmoe.visualization.routing_map import load_font


def _ticks(low, high, count=5):
    return [low + (high - low) * k / (count - 1) for k in range(count)]


def draw_line_chart(series, x_label, y_label, title, x_log=False, size=(640, 420), y_format="{:.3f}"):
    """A chart of `series`: {name: [(x, y), ...]}, one colour per name.

    `x_log` puts x on a log2 scale (positive x only). The right margin (and the
    canvas, if needed) widens to the longest legend name, so none is clipped. Returns a PIL image.
    """
    points = [(x, y) for line in series.values() for x, y in line if y is not None and math.isfinite(y)]
    if not points:
        raise ValueError(f"draw_line_chart: no finite points to draw in {sorted(series)}.")
    if x_log and min(x for x, _ in points) <= 0:
        raise ValueError("draw_line_chart: x_log needs x > 0.")
    scale = math.log2 if x_log else float
    font = load_font(13)
    legend = max(font.getlength(str(name)) for name in series)
    left, bottom, top, right = 70, 50, 50, max(150, math.ceil(legend) + 20)
    width, height = max(size[0], left + right + 320), size[1]  # Widened for long names.
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    xs, ys = [scale(x) for x, _ in points], [y for _, y in points]
    x_min, x_max = min(xs), max(xs)
    x_max = x_max if x_max > x_min else x_min + 1.0
    y_pad = max(0.005, 0.05 * (max(ys) - min(ys)))
    y_min, y_max = min(ys) - y_pad, max(ys) + y_pad

    def to_pixel(x, y):
        return (
            left + (width - left - right) * (scale(x) - x_min) / (x_max - x_min),
            height - bottom - (height - top - bottom) * (y - y_min) / (y_max - y_min),
        )

    draw.line((left, height - bottom, width - right, height - bottom), fill="black")
    draw.line((left, top, left, height - bottom), fill="black")
    for y in _ticks(y_min, y_max):
        _, py = to_pixel(2**x_min if x_log else x_min, y)
        draw.text((8, py - 7), y_format.format(y), fill="black", font=font)
    distinct = sorted({x for x, _ in points})
    last = -math.inf
    for value in distinct if len(distinct) <= 8 else [2**x if x_log else x for x in _ticks(x_min, x_max)]:
        px, _ = to_pixel(value, y_min)
        if px - last >= 32:  # Labels closer than that would overlap.
            draw.text((px - 10, height - bottom + 6), f"{value:.3g}", fill="black", font=font)
            last = px
    draw.text((left, height - 22), x_label, fill="black", font=font)
    draw.text((8, top - 26), y_label, fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    for i, (name, line) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        xy = [to_pixel(x, y) for x, y in line if y is not None and math.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((width - right + 10, top + 20 * i), name, fill=colour, font=font)
    return canvas
