"""Recipe of the `limoe_tiny_cifar10` preset: a LIMoE trained contrastively
on CIFAR-10 images with captions written from the class names.

One shared Transformer (6 blocks of width 192; 8 experts in blocks 3 and 5,
token choice, K = 1, capacity factor 1.0, Batch Priority Routing) reads 64
image patches and up to 16 caption tokens. Each modality is encoded and
routed on its own (an image's patches in one routing group, a caption's
tokens in another): routing a pair together would leak which caption belongs
to which image. CLIP's softmax loss, LIMoE's entropy losses.

    python presets/limoe_tiny_cifar10/recipe.py --cifar10 PATH/cifar10_jpeg.npz \
        --coco PATH/coco_mini_captions.npz

The bundled preset was trained by this recipe on one H100 (JAX) and saved on
a CPU from the run's weights with `--weights softmax.weights.npz --vocabulary
vocabulary.spm --record softmax.record.json`.
"""

import sys

from keras_vmoe.recipes.limoe_cifar10 import TINY_LIMOE
from keras_vmoe.recipes.limoe_cifar10 import LIMoERecipe
from keras_vmoe.recipes.limoe_cifar10 import main

RECIPE = LIMoERecipe(
    name="limoe_tiny_cifar10",
    description="LIMoE (one 6-block MoE Transformer for images and text, 8 experts in "
    "blocks 3 and 5) trained contrastively on CIFAR-10 with template captions; "
    "zero-shot classifier over the CIFAR-10 classes.",
    backbone=TINY_LIMOE,
)

if __name__ == "__main__":
    sys.exit(main(RECIPE, __file__))
