"""draw_routing_map: panel layout, expert tints, dropped cells, legend, errors."""

import re

import numpy as np
import pytest

from keras_vmoe.visualization import draw_routing_map
from keras_vmoe.visualization.routing_map import DROPPED_COLOUR
from keras_vmoe.visualization.routing_map import PALETTE
from keras_vmoe.visualization.routing_map import expert_colours

GREY = 220  # Light, so that even PALETTE[7] (mid grey) stands out from the photo.
PANEL = 192  # The default panel size.
GRID = (3, 3)
# Experts 0..7 and one dropped patch, row-major over the 3x3 grid.
ASSIGNMENT = np.array([[0, 1, 2, 3, 4, 5, 6, 7, -1]])


def grey_photos(count, value=GREY, size=40):
    return [np.full((size, size, 3), value, "uint8") for _ in range(count)]


def draw(photos=1, panels=1, panel_size=PANEL, assignment=ASSIGNMENT, value=GREY, **kwargs):
    assignment = np.repeat(assignment, photos, axis=0)
    assignments = {f"block {p}": assignment for p in range(panels)}
    return draw_routing_map(
        grey_photos(photos, value), assignments, GRID, num_experts=8, panel_size=panel_size, **kwargs
    )


def has_block_of(picture, colour, side=10):
    """Whether a side x side square of exactly `colour` is in the picture (a legend swatch)."""
    mask = (np.asarray(picture) == np.asarray(colour, "uint8")).all(axis=-1)
    windows = np.lib.stride_tricks.sliding_window_view(mask, (side, side))
    return bool(windows.all(axis=(-1, -2)).any())


def test_an_rgb_image_growing_with_panels_images_and_panel_size():
    picture = draw()
    assert picture.mode == "RGB"
    width, height = picture.size
    assert width > 2 * PANEL and height > PANEL
    # One more panel adds a column of the same width each time.
    widths = [draw(panels=n).size[0] for n in (1, 2, 3)]
    assert widths[1] - widths[0] == widths[2] - widths[1] > PANEL
    # More columns only give the legend more room per row.
    assert draw(panels=2).size[1] <= height
    # One more image adds a row of the same height each time.
    heights = [draw(photos=n).size[1] for n in (1, 2, 3)]
    assert heights[1] - heights[0] == heights[2] - heights[1] > PANEL
    assert draw(photos=3).size[0] == width
    # Larger panels: every one of the 2 panels (photo + block) grows.
    assert draw(panel_size=PANEL + 10).size[0] - width == 2 * 10
    # A title and captions add room but change no column.
    titled = draw(title="a title", captions=["cat 93%"])
    assert titled.size[0] == width and titled.size[1] >= height


def cell_pixel(picture, row, column, panel=1, panels=2, dy=0.5, located_on=None):
    """The pixel at (the centre of) a grid cell of a panel of the first image row.

    Found from the photo panel, the only flat GREY square (of `located_on`, a
    picture of the same layout, if given), and the equal width of the `panels`
    columns (each a panel and the margin left of it)."""
    pixels = np.asarray(picture).astype(int)
    grey = (np.asarray(picture if located_on is None else located_on) == GREY).all(axis=-1)
    ys, xs = np.nonzero(grey.sum(axis=1) >= PANEL)[0], np.nonzero(grey.sum(axis=0) >= PANEL)[0]
    assert (len(ys), len(xs)) == (PANEL, PANEL)  # The untinted photo, and nothing else.
    top, left = ys.min(), xs.min()
    pitch = (pixels.shape[1] - left) // panels
    x = left + panel * pitch + int((column + 0.5) * PANEL / GRID[1])
    y = top + int((row + dy) * PANEL / GRID[0])
    return pixels[y, x]


def test_each_patch_is_tinted_toward_its_experts_colour():
    picture = draw()
    photo = np.array([GREY] * 3)
    for expert in range(8):
        row, column = divmod(expert, GRID[1])
        pixel = cell_pixel(picture, row, column)
        colour = np.array(PALETTE[expert])
        assert np.linalg.norm(pixel - colour) < 0.6 * np.linalg.norm(photo - colour), expert
    # Neighbouring cells get different colours.
    assert not np.array_equal(cell_pixel(picture, 0, 0), cell_pixel(picture, 0, 1))
    # The photo panel itself is untouched.
    np.testing.assert_array_equal(cell_pixel(picture, 0, 0, panel=0), photo)


def test_a_dropped_patch_is_dark():
    # Off the centre: the cell carries a light cross through it.
    for value in (GREY, 255):  # Dark whatever the photo, white too.
        pixel = cell_pixel(draw(value=value), 2, 2, dy=0.25, located_on=draw())
        assert (pixel < 80).all(), (value, pixel)


def test_the_legend_has_every_expert_and_dropped_only_when_a_patch_is_dropped():
    with_drop = draw(value=255)
    without_drop = draw(value=255, assignment=np.where(ASSIGNMENT < 0, 0, ASSIGNMENT))
    for picture in (with_drop, without_drop):
        for colour in PALETTE[:8]:
            assert has_block_of(picture, colour), colour
        assert not has_block_of(picture, PALETTE[8])  # 8 experts: no ninth swatch.
    # Tinted cells are blends, never the exact dropped colour: only a swatch is.
    assert has_block_of(with_drop, DROPPED_COLOUR)
    assert not has_block_of(without_drop, DROPPED_COLOUR)


@pytest.mark.parametrize("shape", [(1, 8), (2, 9), (9,)])
def test_wrong_assignment_shapes_name_the_expected_shape(shape):
    with pytest.raises(ValueError, match=re.escape("expected (images, patches) = (1, 9)")) as error:
        draw_routing_map(grey_photos(1), {"block 3": np.zeros(shape, int)}, GRID, num_experts=8)
    assert "'block 3'" in str(error.value) and str(shape) in str(error.value)


def test_expert_colours_are_distinct_beyond_the_palette():
    assert expert_colours(8) == list(PALETTE[:8])
    colours = expert_colours(20)
    assert len(colours) == len(set(colours)) == 20
    for colour in colours:
        assert len(colour) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
    # And a map with 20 experts draws them all in its legend.
    assignment = np.arange(16)[None] % 20
    picture = draw_routing_map(grey_photos(1), {"block": assignment}, (4, 4), num_experts=20)
    assert all(has_block_of(picture, colour) for colour in colours)


# One MoE panel of 96 pixels: the legend wraps to fit the picture.
def test_a_narrow_picture_still_shows_every_legend_entry():
    picture = draw(panel_size=96)
    assert all(has_block_of(picture, colour) for colour in PALETTE[:8])
