"""Recipe of the `vit_tiny_cifar10` preset: the dense ViT of the three.

python presets/vit_tiny_cifar10/recipe.py --cifar10 PATH/cifar10_jpeg.npz
"""

import sys

from keras_vmoe.recipes.cifar10 import TINY_ENCODER
from keras_vmoe.recipes.cifar10 import Cifar10Recipe
from keras_vmoe.recipes.cifar10 import main

RECIPE = Cifar10Recipe(
    name="vit_tiny_cifar10",
    description="Dense ViT (6 blocks of width 192, 4x4 patches) trained on CIFAR-10 from scratch.",
    family="vit",
    backbone=dict(TINY_ENCODER),
)

if __name__ == "__main__":
    sys.exit(main(RECIPE, __file__))
