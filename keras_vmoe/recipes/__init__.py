"""Training recipes of the bundled presets (rerunnable from `presets/<name>/recipe.py`)."""

from keras_vmoe.recipes.cifar10 import Cifar10Recipe
