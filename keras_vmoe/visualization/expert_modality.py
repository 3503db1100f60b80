"""A picture of the modalities each expert serves (the LIMoE paper's analysis).

One panel per MoE block, one column per expert:

- top: a stacked bar, the expert's image share (blue, bottom) and text share
  (orange, top) with both modalities weighted equally
  (`ExpertModalityStats.balanced_share`), the share printed in the bar; a
  star marks a modality-specific expert (share >= the threshold);
- bottom: two bars, the fraction of all image tokens and of all text tokens
  that the expert takes (`modality_distribution`), against the uniform 1/E
  (dotted line).

Example:
```python
stats = keras_vmoe.models.limoe.expert_modality.expert_modality_counts(...)
draw_expert_modality(stats, title="limoe_tiny_cifar10").save("experts.png")
```
"""

import numpy as np
from PIL import Image
from PIL import ImageDraw

from keras_vmoe.visualization.routing_map import load_font

IMAGE_COLOUR = (31, 119, 180)
TEXT_COLOUR = (255, 127, 14)


def _panel(draw, stats, name, left, top, column, threshold, fonts):
    """Draws one block's panel with its top-left corner at (left, top)."""
    font, small = fonts
    share_height, distribution_height = 150, 110
    share = np.nan_to_num(stats.balanced_share)
    distribution = np.nan_to_num(stats.modality_distribution)
    num_experts = share.shape[1]
    dropped = np.nan_to_num(stats.dropped_fraction)
    draw.text((left, top), name, fill=(0, 0, 0), font=font)
    draw.text(
        (left, top + 20),
        f"{int(stats.counts[0].sum()):,} image / {int(stats.counts[1].sum()):,} text tokens kept; "
        f"dropped {dropped[0]:.1%} / {dropped[1]:.1%}",
        fill=(60, 60, 60),
        font=small,
    )
    y0 = top + 44  # Top chart: balanced shares.
    draw.text(
        (left, y0), "share of the expert's tokens (modalities weighted equally)", fill=(0, 0, 0), font=small
    )
    y0 += 18
    specific = stats.specific_experts(threshold)
    for e in range(num_experts):
        x0, x1 = left + e * column + 6, left + (e + 1) * column - 6
        image_top = y0 + share_height * (1 - share[0, e])
        draw.rectangle((x0, y0, x1, image_top), fill=TEXT_COLOUR)
        draw.rectangle((x0, image_top, x1, y0 + share_height), fill=IMAGE_COLOUR)
        if stats.counts[:, e].sum() == 0:
            draw.rectangle((x0, y0, x1, y0 + share_height), fill=(200, 200, 200))
        draw.text((x0 + 3, y0 + share_height - 16), f"{share[0, e]:.0%}", fill=(255, 255, 255), font=small)
        mark = "*" if e in specific["image"] or e in specific["text"] else ""
        draw.text((x0 + 3, y0 + share_height + 3), f"e{e}{mark}", fill=(0, 0, 0), font=small)
    y0 += share_height + 24  # Bottom chart: each modality over the experts.
    scale = max(float(distribution.max()), 1.5 / num_experts)
    draw.text(
        (left, y0), f"fraction of each modality's tokens (chart top: {scale:.0%})", fill=(0, 0, 0), font=small
    )
    y0 += 18
    base = y0 + distribution_height
    for e in range(num_experts):
        x0 = left + e * column + 6
        width = (column - 12) / 2
        for m, colour in enumerate((IMAGE_COLOUR, TEXT_COLOUR)):
            bar_top = base - distribution_height * distribution[m, e] / scale
            draw.rectangle((x0 + m * width, bar_top, x0 + (m + 1) * width - 1, base), fill=colour)
    uniform = base - distribution_height / num_experts / scale
    for x in range(int(left), int(left + num_experts * column), 6):
        draw.line((x, uniform, x + 2, uniform), fill=(0, 0, 0))
    draw.line((left, base, left + num_experts * column, base), fill=(0, 0, 0))
    return base - top + 8


def draw_expert_modality(stats_by_block, title=None, threshold=0.9, column=56):
    """Draws `{block index: ExpertModalityStats}` (see the module docstring).

    Returns:
        A `PIL.Image.Image`.
    """
    if not stats_by_block:
        raise ValueError("draw_expert_modality: no MoE block to draw (empty stats).")
    fonts = load_font(15), load_font(12)
    margin, title_height, legend_height = 14, 30 if title else 0, 44
    num_experts = max(stats.counts.shape[1] for stats in stats_by_block.values())
    panel_width = max(num_experts * column, 440)
    width = margin + len(stats_by_block) * (panel_width + 2 * margin)
    height = title_height + 360 + legend_height
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((margin, 8), title, fill=(0, 0, 0), font=fonts[0])
    bottom = 0
    for p, (index, stats) in enumerate(stats_by_block.items()):
        left = margin + p * (panel_width + 2 * margin)
        bottom = max(
            bottom,
            _panel(draw, stats, f"MoE block {index}", left, title_height + 4, column, threshold, fonts),
        )
    y = title_height + bottom + 6
    for k, (label, colour) in enumerate((("image", IMAGE_COLOUR), ("text", TEXT_COLOUR))):
        draw.rectangle((margin + k * 90, y, margin + k * 90 + 16, y + 16), fill=colour, outline=(0, 0, 0))
        draw.text((margin + k * 90 + 22, y), label, fill=(0, 0, 0), font=fonts[1])
    draw.text(
        (margin + 190, y),
        f"* modality-specific: share >= {threshold:.0%};  dotted: uniform 1/E",
        fill=(0, 0, 0),
        font=fonts[1],
    )
    return canvas.crop((0, 0, width, min(height, y + 26)))
