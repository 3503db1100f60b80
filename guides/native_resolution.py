"""
Title: Native resolution (NaViT): images of any size and aspect ratio, packed
Author: keras_vmoe contributors
Date created: 2026/12/04
Last modified: 2026/12/05
Description: Cut images into patches at their own resolution, pack several into one sequence, train and predict on lists of differently sized images with a V-MoE (from lists or a tf.data stream), train LIMoE on them, and use ViT-22B's parallel block.
Accelerator: None
"""

"""
## Introduction

["Patch n' Pack: NaViT"](https://arxiv.org/abs/2307.06304) (Dehghani et al.,
2023) stops resizing every image to one square. Each image is cut into
patches at (nearly) its own resolution and aspect ratio; several images are
packed into one sequence of fixed length; attention is masked to each image;
pooling is per image. One model then serves many resolutions.

In keras_vmoe every image backbone (`VisionTransformerBackbone`,
`VMoEBackbone`, `SoftMoEBackbone`) takes `native_resolution=True`. Its input
is a packed batch, three arrays:

- `patches` (sequences, L, ph * pw * C): each patch's pixels;
- `positions` (sequences, L, 2): the patch's (row, column) in its image;
- `segment_ids` (sequences, L): 1..N for the images of a sequence, 0 for
  padding.

Its pooled output is one vector per image slot, (sequences, N, dim).
"""

"""
## Setup

Choose the backend with `KERAS_BACKEND`. CIFAR-10 is read from
`data/cifar10_jpeg.npz` in the shared folder (`../shared` next to the
repository, or `KERAS_VMOE_SHARED`). `KERAS_VMOE_GUIDE_FAST=1` trains on a
few hundred images (used by the test suite).
"""

import os
import pathlib

import keras
import numpy as np
from PIL import Image

from keras_vmoe.layers import EncoderBlock
from keras_vmoe.layers import ImagePatcher
from keras_vmoe.layers import Mlp
from keras_vmoe.layers import SequencePacker
from keras_vmoe.models import NativeResolutionImageClassifierPreprocessor
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", pathlib.Path.cwd().parent / "shared"))

"""
## Patching and packing

`ImagePatcher` resizes an image to a patch budget, keeping its aspect ratio:
an image within the budget keeps its own resolution (rounded down to whole
patches), a larger one is scaled down. Nothing is cropped.
"""

patcher = ImagePatcher(patch_size=4, max_patches=64, max_grid=(12, 12), scale=1 / 127.5, offset=-1.0)
rng = np.random.default_rng(0)
images = [
    rng.integers(0, 256, (h, w, 3)).astype("uint8") for h, w in [(16, 40), (32, 32), (48, 20), (12, 12)]
]
for image in images:
    patches, positions = patcher(image)
    print(f"{image.shape[:2]} -> {len(patches)} patches, grid {tuple(int(v) for v in positions.max(0) + 1)}")

"""
`SequencePacker` fills sequences greedily, first fit, with whole images. It
returns the packed batch and each image's (sequence, slot).
"""

packer = SequencePacker(sequence_length=96, max_images=4)
batch, image_index = packer.pack([patcher(image) for image in images])
print("segment ids of sequence 0:", batch["segment_ids"][0].tolist())
print("image -> (sequence, slot):", image_index.tolist())

"""
## A native-resolution V-MoE

`position_embedding="factorized"` adds a learned row and a learned column
embedding (`"factorized_fractional"` indexes them by the fraction of the
image's side instead). With `packed_routing="image"` (the default) each image
is its own routing group, so an image's outputs never depend on the images it
is packed with; `"sequence"` routes a whole sequence as one group, cheaper,
where images compete for capacity as images in a group always do.
"""

keras.utils.set_random_seed(0)
backbone = VMoEBackbone(
    image_shape=(48, 48, 3),  # the largest image: 12 x 12 patches of 4 pixels
    patch_size=4,
    num_layers=4,
    hidden_dim=64,
    mlp_dim=128,
    num_heads=4,
    pooling="gap",
    moe_layers=(1, 3),
    num_experts=4,
    num_selected_experts=1,
    capacity_factor=2.0,
    native_resolution=True,
    position_embedding="factorized",
    max_images_per_sequence=4,
)
pooled = keras.ops.convert_to_numpy(backbone(batch))
print("pooled:", pooled.shape)
alone = keras.ops.convert_to_numpy(backbone(packer.pack([patcher(images[1])])[0]))[0, 0]
sequence, slot = image_index[1]
print("image 1 alone vs packed, max |difference|:", float(np.abs(alone - pooled[sequence, slot]).max()))

"""
## Training and predicting on lists of images

`NativeResolutionImageClassifierPreprocessor.for_backbone` reads the
backbone's options. The classifier's `fit`, `evaluate` and `predict` then
take lists of images of any sizes; `predict` returns one row per image, in
order. `max_patches=(16, 144)` makes each training image draw its own patch
budget (a resolution range); `token_drop_rate` is NaViT's token dropping.
"""


def resized(image, side_low, side_high, rng):
    height, width = rng.integers(side_low, side_high + 1, 2)
    return np.asarray(Image.fromarray(image).resize((int(width), int(height)), Image.BILINEAR))


archive = SHARED / "data" / "cifar10_jpeg.npz"
from keras_vmoe.data import load_cifar10  # noqa: E402

train_images, train_labels = load_cifar10(archive, "train", limit=256 if FAST else 5000)
test_images, test_labels = load_cifar10(archive, "test", limit=128 if FAST else 1000)
train_images = [resized(image, 16, 48, rng) for image in train_images]

preprocessor = NativeResolutionImageClassifierPreprocessor.for_backbone(
    backbone,
    max_patches=(16, 144),
    sequence_length=160,
    scale=1 / 127.5,
    offset=-1.0,
    token_drop_rate=(0.0, 0.3),
)
classifier = VMoEImageClassifier(backbone, num_classes=10, preprocessor=preprocessor)
classifier.compile(optimizer=keras.optimizers.Adam(1e-3))
history = classifier.fit(train_images, train_labels, batch_size=8, epochs=1 if FAST else 3)
print({name: round(values[-1], 4) for name, values in history.history.items()})

"""
## Streaming from `tf.data`

`fit` on a list packs the images once. `packed_dataset` turns a
`tf.data.Dataset` of single `(image, label)` pairs into packed batches of one
fixed shape (`num_sequences` sequences each, so one compiled step): it
patches and packs anew on every pass, so each epoch draws new patch budgets
and new token dropping. It feeds `fit` and `evaluate` on every backend.
"""

import tensorflow as tf  # noqa: E402

stream = tf.data.Dataset.from_generator(
    lambda: zip(train_images, train_labels),
    output_signature=(
        tf.TensorSpec((None, None, 3), tf.uint8),
        tf.TensorSpec((), tf.as_dtype(train_labels.dtype)),
    ),
)
packed_stream = preprocessor.packed_dataset(stream, num_sequences=8, training=True).prefetch(2)
x, y, sample_weight = next(iter(packed_stream))
print(
    "patches", x["patches"].shape, "labels", y.shape, "images in the batch", int(sample_weight.numpy().sum())
)
classifier.fit(packed_stream, epochs=1)

"""
One model, many resolutions: evaluate the same classifier on the test images
resized to several square sizes.
"""

for side in (16, 32, 48):
    logits = classifier.predict([resized(image, side, side, rng) for image in test_images], verbose=0)
    print(f"{side} px: top-1 {np.mean(np.argmax(logits, -1) == test_labels):.3f}")

"""
`benchmarks/navit.py resolution` runs this comparison properly (a model
trained at mixed resolutions against one trained at 32 pixels, at the same
cost) and `benchmarks/navit.py throughput` measures packing against padding.
"""

"""
## LIMoE at native resolution

`LIMoEBackbone(native_resolution=True, ...)` packs images the same way;
each image slot carries its caption, so `token_ids` and `padding_mask` are
(sequences, N, text length) and both embeddings come back per slot,
(sequences, N, embedding_dim), zeros in empty slots. Give
`LIMoEPreprocessor` an `image_packer` and `LIMoEContrastiveModel.fit` takes
`{"images": [images of any sizes], "text": [captions]}`; the contrastive
loss counts the filled slots only.
"""

from keras_vmoe.models import LIMoEBackbone  # noqa: E402
from keras_vmoe.models import LIMoEContrastiveModel  # noqa: E402
from keras_vmoe.models import LIMoEPreprocessor  # noqa: E402
from keras_vmoe.models import LIMoETokenizer  # noqa: E402
from keras_vmoe.models import train_limoe_vocabulary  # noqa: E402

names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
captions = [f"a photo of a {names[label]}." for label in train_labels]
tokenizer = LIMoETokenizer(proto=train_limoe_vocabulary(captions, 300))
limoe = LIMoEBackbone(
    image_shape=(48, 48, 3),
    patch_size=4,
    vocabulary_size=tokenizer.vocabulary_size(),
    max_text_length=8,
    num_layers=2,
    hidden_dim=64,
    mlp_dim=128,
    num_heads=4,
    embedding_dim=32,
    moe_layers=(1,),
    num_experts=4,
    native_resolution=True,
    max_images_per_sequence=4,
    parallel_block=True,
    use_bias=False,
)
image_packer = NativeResolutionImageClassifierPreprocessor.for_backbone(
    limoe, max_patches=(16, 144), sequence_length=160, scale=1 / 127.5, offset=-1.0
)
contrastive = LIMoEContrastiveModel(
    limoe, LIMoEPreprocessor(tokenizer, sequence_length=8, image_packer=image_packer)
)
contrastive.compile(optimizer=keras.optimizers.Adam(1e-3))
limit = 64 if FAST else 1000
contrastive.fit({"images": train_images[:limit], "text": captions[:limit]}, batch_size=8, epochs=1)

"""
## ViT-22B's block

`parallel_block=True` runs attention and MLP in parallel from one LayerNorm,
`y = x + attention(norm(x)) + mlp(norm(x))`; `use_bias=False` drops the
biases of the attention and MLP (or expert) projections. Both are options of
every backbone, and of `EncoderBlock` itself.
"""

block = EncoderBlock(4, Mlp(128, use_bias=False), parallel_block=True, use_bias=False)
print(block(np.ones((1, 9, 64), "float32")).shape, [w.path for w in block.weights])
