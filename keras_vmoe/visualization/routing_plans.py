"""A picture of routing plans: one tokens x experts grid per router, side by side.

Each cell's shade is the router's score for that (token, expert) pair (its
gate or its transport plan value, scaled per panel); a dot marks the pairs the
plan dispatched, so a row without a dot is a dropped token and a column's dots
are the tokens an expert took.

Example:
```python
plan, _ = router(tokens)                       # tokens (1, S, D)
scores, _, _ = router.route_gates(tokens, False, None)
picture = draw_routing_plans({"softmax": (scores[0], dispatched_pairs(plan)[0])})
picture.save("plans.png")
```
"""

import numpy as np
from PIL import Image
from PIL import ImageDraw

from keras_vmoe.visualization.routing_map import load_font


def dispatched_pairs(plan):
    """(G, S, E) bool: which (token, expert) pairs a sparse `RoutingPlan` dispatched."""
    dispatch = np.asarray(plan.dispatch_index)  # (G, E, C)
    num_groups, num_experts, _ = dispatch.shape
    group_size = np.asarray(plan.combine_index).shape[1]
    pairs = np.zeros((num_groups, group_size, num_experts), bool)
    for g, e, c in zip(*np.nonzero(dispatch < group_size)):
        pairs[g, dispatch[g, e, c], e] = True
    return pairs


def draw_routing_plans(panels, cell=18, title=None):
    """A PIL image of {panel title: (scores (S, E), dispatched (S, E) bool)}."""
    font = load_font(13)
    names = list(panels)
    group_size, num_experts = np.asarray(panels[names[0]][0]).shape
    panel_width, top = num_experts * cell, 56 if title else 36
    stride = max(panel_width, 190) + 20  # Room for each panel's title.
    width = 60 + len(names) * stride
    height = top + group_size * cell + 40
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((10, 8), title, fill="black", font=font)
    for index, name in enumerate(names):
        scores, dispatched = (np.asarray(a) for a in panels[name])
        shade = scores / max(float(scores.max()), 1e-12)
        x0 = 60 + index * stride
        draw.text((x0, top - 18), name, fill="black", font=font)
        for s in range(group_size):
            for e in range(num_experts):
                level = int(255 - 200 * float(shade[s, e]))
                box = (x0 + e * cell, top + s * cell, x0 + (e + 1) * cell - 1, top + (s + 1) * cell - 1)
                draw.rectangle(box, fill=(level, level, 255))
                if dispatched[s, e]:
                    cx, cy = x0 + e * cell + cell / 2, top + s * cell + cell / 2
                    draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill="black")
        draw.text((x0, top + group_size * cell + 6), "experts ->", fill="black", font=font)
    draw.text((4, top + 4), "tokens", fill="black", font=font)
    return canvas
