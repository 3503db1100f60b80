"""
Title: Fewer tokens, faster blocks: a ViT with a PatchMerger on CIFAR-10
Author: keras_vmoe contributors
Date created: 2026/11/22
Last modified: 2026/11/22
Description: Merge a ViT's patch tokens into a few learned tokens halfway through the encoder, see what the merger does, and train it.
Accelerator: None
"""

"""
## Introduction

A Vision Transformer spends its compute per token: every block runs its
attention and its MLP on every patch of the image. The PatchMerger
(["Learning to Merge Tokens in Vision Transformers"](https://arxiv.org/abs/2202.12015),
Renggli et al., 2022) cuts that cost in the second half of the network. Placed
between two blocks, it turns the `N` tokens into `M` new ones (the paper uses
`M = 8`), and every later block runs on those `M` tokens only.

Each output token is a learned weighted average of the input tokens:

```
x = LayerNorm(tokens)             # (N, D)
weights = softmax(W^T x^T)        # (M, N), each row softmaxed over the N tokens
merged = weights @ x              # (M, D)
```

`W` is a `(D, M)` matrix: one learned "query" per output token. The weights
of an output token are non-negative and sum to one, so each merged token is a
convex combination of the inputs, and which patches it mixes depends on the
image.

In this guide we look at the `PatchMerger` layer on its own, put one into a
small ViT, count what it saves, train the ViT on a subset of CIFAR-10 next to
the same ViT without a merger, and look at which patches the merged tokens
draw from.
"""

"""
## Setup

Choose the backend with `KERAS_BACKEND` (`jax`, `tensorflow` or `torch`).
CIFAR-10 is read from `data/cifar10_jpeg.npz` in the shared folder: by
default `../shared` next to the repository, or the folder named by
`KERAS_VMOE_SHARED`. `KERAS_VMOE_GUIDE_FAST=1` runs the guide on a tiny subset
for one epoch (used by the test suite; its accuracies mean nothing).
"""

import io
import os
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf  # Only for the `tf.data` input pipeline (a keras-hub dependency).
from PIL import Image

from keras_vmoe.layers import PatchMerger
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models.vmoe.vmoe_architectures import architecture_config

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"

SEED = 42
NUM_TRAIN = 128 if FAST else 10_000
NUM_TEST = 128 if FAST else 10_000
EPOCHS = 1 if FAST else 5
BATCH_SIZE = 64
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, fast mode: {FAST}")

"""
## The layer on its own

A `PatchMerger(num_tokens=M)` maps `(batch, N, D)` to `(batch, M, D)`. Its
`merge_weights` method returns the `(batch, M, N)` weights it averages with
(computed in float32, also under a mixed precision policy).
"""

keras.utils.set_random_seed(SEED)
tokens = np.random.default_rng(SEED).normal(size=(2, 64, 32)).astype("float32")
merger = PatchMerger(num_tokens=8)
merged = merger(tokens)
weights = keras.ops.convert_to_numpy(merger.merge_weights(tokens))
print("tokens in:", tokens.shape, "-> tokens out:", tuple(merged.shape))
print("merge weights:", weights.shape, "| row sums:", np.round(weights.sum(-1)[0], 5))
print("smallest weight:", weights.min(), "| largest weight:", round(float(weights.max()), 4))

"""
With its fresh LeCun-normal `W`, the scores have unit scale, so each merged
token starts as a smooth average of many tokens (the largest weight is well
below one). Training can sharpen the weights; after this guide's short run
they are still broad (see the end of the guide).

The merger's parameters are the LayerNorm's scale and offset and `W`:
`2 D + D M` numbers, 320 here.
"""

print("PatchMerger parameters:", merger.count_params())

"""
## Data

CIFAR-10 is stored as JPEG bytes: every split is one concatenated byte array
plus offsets, and image `i` is `jpeg[offsets[i]:offsets[i + 1]]`. We decode a
random training subset and the test images with Pillow, then map the pixels
from `[0, 255]` to `[-1, 1]`, the range vmoe's models are trained with.
"""


def load_cifar10(split, count, seed=SEED):
    """Decodes `count` random images of a split; returns pixels in [-1, 1]."""
    with np.load(CIFAR10) as data:
        jpeg, offsets, labels = data[f"{split}_jpeg"], data[f"{split}_offsets"], data[f"{split}_labels"]
    indices = np.random.default_rng(seed).permutation(len(labels))[:count]
    images = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
            for i in indices
        ]
    )
    return images.astype("float32") / 127.5 - 1.0, labels[indices].astype("int32")


start = time.perf_counter()
x_train, y_train = load_cifar10("train", NUM_TRAIN)
x_test, y_test = load_cifar10("test", NUM_TEST)
print(f"train {x_train.shape}, test {x_test.shape}, decoded in {time.perf_counter() - start:.1f} s")


def train_dataset():
    return (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=SEED)
        .batch(BATCH_SIZE)
    )


"""
## A ViT with a PatchMerger

Every backbone of the package takes a `patch_merger` argument:
`dict(after_block=b, num_tokens=M)` puts a `PatchMerger` after block `b`
(counting from 0). The dense ViT here is a `VMoEBackbone` with no MoE layers;
`VMoEBackbone` with `moe_layers` (V-MoE) and `SoftMoEBackbone` take the same
argument.

Our ViT cuts the 32x32 images into 4x4 patches (64 tokens), has 6 blocks of
width 64, and classifies from the class token. We merge the 64 patch tokens
into 8 after block 2, the middle of the encoder, as the paper does.

**The class token is not merged.** It passes through the merger unchanged,
ahead of the merged tokens, so blocks 3 to 5 see 1 + 8 = 9 tokens, and
`pooling="token"` still reads a class token that attended to all the patches
in the first half and to the merged tokens in the second.
"""

IMAGE_SHAPE = (32, 32, 3)
vit_arguments = dict(
    image_shape=IMAGE_SHAPE,
    patch_size=4,
    num_layers=6,
    hidden_dim=64,
    mlp_dim=256,
    num_heads=4,
    pooling="token",
)
PATCH_MERGER = dict(after_block=2, num_tokens=8)


def build(patch_merger):
    backbone = VMoEBackbone(**vit_arguments, patch_merger=patch_merger)
    return VMoEImageClassifier(backbone, num_classes=10)


keras.utils.set_random_seed(SEED)
model = build(PATCH_MERGER)
backbone = model.backbone
for block in backbone.encoder_blocks:
    print(f"{block.name}: {block.output.shape[1]} tokens")
print("after the merger:", backbone.get_layer("patch_merger").output.shape)

"""
How much does that save? Per block with `T` tokens of width `D` and an MLP of
width `H`, the multiply-adds are about `4 T D^2` (query, key, value and output
projections) `+ 2 T^2 D` (attention scores and weighted values) `+ 2 T D H`
(the MLP).
"""


def block_macs(tokens, dim=64, mlp_dim=256):
    return 4 * tokens * dim**2 + 2 * tokens**2 * dim + 2 * tokens * dim * mlp_dim


without = 6 * block_macs(65)
with_merger = 3 * block_macs(65) + 2 * 64 * 8 * 64 + 3 * block_macs(9)
print(
    f"encoder blocks: {without / 1e6:.1f} M multiply-adds per image without the merger, "
    f"{with_merger / 1e6:.1f} M with it ({without / with_merger:.2f}x fewer)"
)

"""
The three blocks after the merger now cost about an eighth of the others, so
the encoder does a little more than half the work. The paper's ViT-B/16 (197 tokens, 8 after block 5 of 12) saves in the
same proportion; `benchmarks/patch_merger.py` measures what that gives in
images per second on each backend. The paper's named configurations are
built in: `VMoEBackbone.from_architecture("vit_b16_pm8")` and
`"vmoe_b16_every2_e8_k2_pm8"` (V-MoE B/16 with 8 experts, top-2, on every
other block):
"""

print(
    {
        key: value
        for key, value in architecture_config("vmoe_b16_every2_e8_k2_pm8").items()
        if key in ("num_layers", "moe_layers", "patch_merger", "group_size")
    }
)

"""
In that V-MoE the MoE layers after the merger route 9 tokens per image; its
`group_size` (8 images of 197 tokens) becomes 8 images of 9 tokens there.

## Training

We train the ViT with the merger and the same ViT without it, with the same
recipe, reseeded before each: Adam with a short linear warmup and a cosine
decay, and a sparse categorical cross-entropy on logits. No augmentation, no
regularisation.
"""


def train_and_evaluate(name, patch_merger):
    keras.utils.set_random_seed(SEED)
    model = build(patch_merger)
    steps = EPOCHS * int(np.ceil(len(x_train) / BATCH_SIZE))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=1e-3,
        warmup_steps=max(1, steps // 10),
        decay_steps=max(1, steps - steps // 10),
        alpha=0.01,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"\n=== {name}: {model.count_params():,} parameters")
    start = time.perf_counter()
    history = model.fit(train_dataset(), epochs=EPOCHS, verbose=2)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    results = model.evaluate(x_test, y_test, batch_size=250, verbose=0, return_dict=True)
    test_seconds = time.perf_counter() - start
    return model, dict(
        name=name,
        params=model.count_params(),
        train_accuracy=history.history["accuracy"][-1],
        test_accuracy=results["accuracy"],
        train_seconds=train_seconds,
        test_seconds=test_seconds,
    )


merged_model, merged_results = train_and_evaluate("ViT + PatchMerger", PATCH_MERGER)
_, plain_results = train_and_evaluate("ViT", None)

print(
    f"\n{'model':<18} {'parameters':>11} {'train acc':>10} {'test acc':>9} {'train time':>11} {'test time':>10}"
)
for row in (merged_results, plain_results):
    print(
        f"{row['name']:<18} {row['params']:>11,} {row['train_accuracy']:>10.4f} "
        f"{row['test_accuracy']:>9.4f} {row['train_seconds']:>10.1f}s {row['test_seconds']:>9.1f}s"
    )
print(
    f"(backend {keras.backend.backend()}, {len(x_train)} training images, "
    f"{EPOCHS} epoch(s), {len(x_test)} test images)"
)

"""
The first epoch's time includes tracing and compiling the model, and on a
shared CPU the wall times move by tens of percent between runs; the
benchmark compares the two models in one process, round by round.

## What the merged tokens look at

For a few test images we take the tokens that enter the merger (the output of
block 2) and ask the trained merger for its weights. For each of the 8x8
patches we print the merged token (0 to 7) that takes the largest share of
it: a map of how the merger groups the image.
"""

merged_backbone = merged_model.backbone
probe = keras.Model(merged_backbone.input, merged_backbone.get_layer("encoder_block_2").output)
merger = merged_backbone.get_layer("patch_merger")
entering = probe(x_test[:3])
weights = keras.ops.convert_to_numpy(merger.merge_weights(entering))  # (3, 8, 64), class token excluded
class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
for image_index in range(3):
    owner = weights[image_index].argmax(axis=0).reshape(8, 8)
    print(
        f"\ntest image {image_index} ({class_names[y_test[image_index]]}): "
        f"merged token taking the most of each patch"
    )
    for row in owner:
        print("  " + " ".join(str(token) for token in row))
    peak = weights[image_index].max(axis=1)
    print("  largest weight of each merged token:", " ".join(f"{w:.3f}" for w in peak))

"""
Every row of those weights sums to exactly one (each merged token is an
average of patches), while a column can sum to anything from 0 to 8: a patch
can feed several merged tokens, or almost none. After a short training run
the groups are coarse and the weights broad.

## Discussion

On the JAX backend, on a 2-core CPU machine (all threads), a full run of this
guide (10,000 training images, 5 epochs, all 10,000 test images) printed:

| model | parameters | test accuracy | 5 epochs of training | evaluation |
|---|---|---|---|---|
| ViT + PatchMerger | 308,682 | 46.9% | 124 s | 5.2 s |
| ViT | 308,042 | 47.6% | 183 s | 10.6 s |

The training accuracies after 5 epochs were 52.0% and 52.1%. In that run
the merged tokens' largest weights were 3% to 10%: each merged token was
still a broad average of patches, though the sky of the airplane image (its
top rows) went mostly to one merged token.

What to take away:

- **Cost.** Merging 64 tokens into 8 halfway through removes about 45% of
  the encoder's multiply-adds, for `2 D + D M` = 640 extra parameters. The
  run above evaluated twice as fast and trained about 1.5 times as fast; those
  wall times come from one run on a shared machine, where they move by tens
  of percent (`benchmarks/patch_merger.py` measures the speed-up properly).
- **Accuracy.** The merged model ended 0.7 points behind, from one seed and
  one run; the Soft MoE guide saw about a point of seed-to-seed variation on
  a similar setup, so this run shows no clear cost in accuracy, and no
  benefit. The paper reports matching upstream and fine-tuning quality for
  large models trained on large data, where the savings matter most.
- **Placement.** Earlier merging saves more compute and leaves fewer blocks
  working on all the patches; later merging saves less. The paper's main
  experiments merge into `M = 8` tokens in the middle of the network, which
  is what the `_pm8` architectures do.
- **Class token.** Here it is kept out of the merge; with
  `use_class_token=False` and `pooling="gap"` the merger merges every token
  and the model classifies from the average of the merged tokens.
"""
