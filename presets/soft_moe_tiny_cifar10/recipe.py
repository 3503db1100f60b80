"""Recipe of the `soft_moe_tiny_cifar10` preset: the Soft MoE of the three.

Blocks 3 and 5 hold a Soft MoE of 8 experts with 8 slots each: 64 slots per
image, as many as the 64 tokens the dense MLP processes, plus the small
dispatch and combine products.

    python presets/soft_moe_tiny_cifar10/recipe.py --cifar10 PATH/cifar10_jpeg.npz
"""

import sys

from keras_vmoe.recipes.cifar10 import TINY_ENCODER
from keras_vmoe.recipes.cifar10 import Cifar10Recipe
from keras_vmoe.recipes.cifar10 import main

RECIPE = Cifar10Recipe(
    name="soft_moe_tiny_cifar10",
    description="Soft MoE (the dense ViT with 8 experts of 8 slots in blocks 3 and 5) trained "
    "on CIFAR-10 from scratch.",
    family="soft_moe",
    backbone=dict(TINY_ENCODER, moe_layers=(3, 5), num_experts=8, slots_per_expert=8),
)

if __name__ == "__main__":
    sys.exit(main(RECIPE, __file__))
