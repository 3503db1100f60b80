import numpy as np
import pytest

from keras_vmoe.visualization.line_chart import draw_line_chart
from keras_vmoe.visualization.routing_map import PALETTE


def test_long_legend_names_stay_inside_the_canvas():
    name = "NaViT-style, mixed 16-48 px, per-image routing groups"
    chart = np.asarray(draw_line_chart({name: [(16, 0.4), (48, 0.5)]}, "side", "top-1", "t"))
    colour = np.asarray(PALETTE[0])
    columns = np.nonzero(np.all(chart == colour, axis=-1).any(axis=0))[0]
    assert columns.size and columns.max() < chart.shape[1] - 2  # The legend's last letter is drawn.
    assert np.all(chart[:, -2:] == 255)  # Nothing touches the right edge.


def test_no_finite_point_is_an_error():
    with pytest.raises(ValueError, match="no finite points"):
        draw_line_chart({"a": [(1, float("nan"))]}, "x", "y", "t")
