"""Recipe of the `vmoe_tiny_cifar10` preset: the V-MoE of the three.

Blocks 3 and 5 hold 8 experts; each token goes to its top-1 expert (K=1)
with capacity factor 1.0, so the experts have 8 slots each, 64 per image:
the dense ViT's per-token FLOPs plus a router. Batch Priority Routing
decides which tokens an expert drops when it is full. Each image is routed on its
own (`group_size=None`), so any batch size can be classified.

    python presets/vmoe_tiny_cifar10/recipe.py --cifar10 PATH/cifar10_jpeg.npz
"""

import sys

from keras_vmoe.recipes.cifar10 import TINY_ENCODER
from keras_vmoe.recipes.cifar10 import Cifar10Recipe
from keras_vmoe.recipes.cifar10 import main

RECIPE = Cifar10Recipe(
    name="vmoe_tiny_cifar10",
    description="V-MoE (the dense ViT with 8 top-1 experts in blocks 3 and 5) trained on "
    "CIFAR-10 from scratch.",
    family="vmoe",
    backbone=dict(
        TINY_ENCODER,
        moe_layers=(3, 5),
        num_experts=8,
        num_selected_experts=1,
        capacity_factor=1.0,
        group_size=None,
        # Batch Priority Routing: when an expert is full, the tokens it
        # drops are the ones the router is least sure of.
        batch_priority=True,
    ),
)

if __name__ == "__main__":
    sys.exit(main(RECIPE, __file__))
