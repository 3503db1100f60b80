"""A picture of which expert each patch goes to, drawn over the image.

One row per image: the photo, then one panel per MoE block with each patch
tinted in the colour of its expert (the V-MoE and LIMoE papers' routing
pictures), a legend of the expert colours below. Patches a sparse block
dropped are dark with a cross.

Example:
```python
assignments = keras_vmoe.models.expert_assignments(backbone, pixels)
picture = keras_vmoe.visualization.draw_routing_map(
    photos, {f"block {i}": a for i, a in assignments.items()},
    grid_shape=(8, 8), num_experts=8, captions=["cat 0.93"])
picture.save("routing.png")
```
"""

import colorsys

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

# Tableau's ten categorical colours: distinct at a glance, also when tinted.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
DROPPED_COLOUR = (30, 30, 30)


def expert_colours(num_experts):
    """One RGB colour per expert: the palette, or evenly spaced hues beyond it."""
    if num_experts <= len(PALETTE):
        return list(PALETTE[:num_experts])
    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / num_experts, 0.75, 0.9))
        for i in range(num_experts)
    ]


def load_font(size):
    """Pillow's default font at `size` (its bitmap font on old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size.
        return ImageFont.load_default()


def _tint_patches(photo, assignment, grid_shape, colours, alpha):
    """The photo with each grid cell tinted in its expert's colour."""
    size = photo.size[0]
    rows, columns = grid_shape
    overlay = Image.new("RGB", photo.size)
    mask = Image.new("L", photo.size, 0)
    draw, draw_mask = ImageDraw.Draw(overlay), ImageDraw.Draw(mask)
    cell_h, cell_w = size / rows, size / columns
    for r in range(rows):
        for c in range(columns):
            expert = int(assignment[r * columns + c])
            box = (
                round(c * cell_w),
                round(r * cell_h),
                round((c + 1) * cell_w) - 1,
                round((r + 1) * cell_h) - 1,
            )
            if expert < 0:
                draw.rectangle(box, fill=DROPPED_COLOUR)
                draw_mask.rectangle(box, fill=215)
            else:
                draw.rectangle(box, fill=colours[expert])
                draw_mask.rectangle(box, fill=int(255 * alpha))
    tinted = Image.composite(overlay, photo, mask)
    draw = ImageDraw.Draw(tinted)
    for r in range(rows):
        for c in range(columns):
            if int(assignment[r * columns + c]) < 0:
                x0, y0 = round(c * cell_w) + 2, round(r * cell_h) + 2
                x1, y1 = round((c + 1) * cell_w) - 3, round((r + 1) * cell_h) - 3
                draw.line((x0, y0, x1, y1), fill=(230, 230, 230), width=1)
                draw.line((x0, y1, x1, y0), fill=(230, 230, 230), width=1)
    for r in range(1, rows):  # Thin grid lines.
        draw.line((0, round(r * cell_h), size, round(r * cell_h)), fill=(255, 255, 255), width=1)
    for c in range(1, columns):
        draw.line((round(c * cell_w), 0, round(c * cell_w), size), fill=(255, 255, 255), width=1)
    return tinted


def draw_routing_map(
    photos, assignments, grid_shape, num_experts, captions=None, title=None, panel_size=192, alpha=0.55
):
    """Draws routing decisions over the images.

    Args:
        photos: list of uint8 (H, W, 3) square images (what the model saw,
            at any resolution; each is resized to `panel_size`).
        assignments: {panel title: int array (images, patches)}: the expert
            of each patch token (row-major over the patch grid), -1 for a
            dropped token. Class tokens must already be removed.
        grid_shape: (rows, columns) of the patch grid.
        num_experts: int. Colours in the legend.
        captions: None or one string per image, written under it.
        title: None or a line written at the top.
        panel_size: pixels per panel side.
        alpha: opacity of the expert colours over the photo.

    Returns:
        A `PIL.Image.Image`.
    """
    rows, columns = grid_shape
    for name, assignment in assignments.items():
        assignment = np.asarray(assignment)
        if assignment.shape != (len(photos), rows * columns):
            raise ValueError(
                f"draw_routing_map: assignments[{name!r}] has shape {assignment.shape}; expected "
                f"(images, patches) = ({len(photos)}, {rows * columns}) for a {rows}x{columns} grid."
            )
    colours = expert_colours(num_experts)
    font, small = load_font(15), load_font(13)
    margin, caption_height, header_height = 12, 22, 24
    title_height = 30 if title else 0
    panels = 1 + len(assignments)
    width = margin + panels * (panel_size + margin)
    legend_columns = max(1, min(num_experts + 1, (width - margin) // 110))
    legend_rows = -(-(num_experts + 1) // legend_columns)  # Room for "dropped" too.
    height = (
        title_height
        + header_height
        + len(photos) * (panel_size + caption_height + margin)
        + legend_rows * 24
        + margin
    )
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((margin, 8), title, fill=(0, 0, 0), font=font)
    y = title_height
    for p, name in enumerate(["image", *assignments]):
        draw.text((margin + p * (panel_size + margin), y + 4), name, fill=(0, 0, 0), font=font)
    y += header_height
    for i, photo in enumerate(photos):
        photo = Image.fromarray(np.asarray(photo, "uint8")).convert("RGB")
        photo = photo.resize((panel_size, panel_size), Image.LANCZOS)
        canvas.paste(photo, (margin, y))
        for p, assignment in enumerate(assignments.values(), start=1):
            tinted = _tint_patches(photo, np.asarray(assignment)[i], grid_shape, colours, alpha)
            canvas.paste(tinted, (margin + p * (panel_size + margin), y))
        if captions:
            draw.text((margin, y + panel_size + 3), captions[i], fill=(0, 0, 0), font=small)
        y += panel_size + caption_height + margin
    entries = [(f"expert {e}", colours[e]) for e in range(num_experts)]
    if any((np.asarray(a) < 0).any() for a in assignments.values()):
        entries.append(("dropped", DROPPED_COLOUR))
    for k, (label, colour) in enumerate(entries):
        x = margin + (k % legend_columns) * 110
        row_y = y + (k // legend_columns) * 24
        draw.rectangle((x, row_y + 2, x + 16, row_y + 18), fill=colour, outline=(0, 0, 0))
        draw.text((x + 22, row_y + 2), label, fill=(0, 0, 0), font=small)
    return canvas
