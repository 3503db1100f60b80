"""
Title: Loading a V-MoE checkpoint and fine-tuning it on CIFAR-10
Author: keras_vmoe contributors
Date created: 2026/11/22
Last modified: 2026/11/22
Description: Convert a google-research/vmoe checkpoint into a Keras model, check it against the reference, and fine-tune it with `model.fit`.
Accelerator: None
"""

"""
## Introduction

[V-MoE](https://arxiv.org/abs/2106.05974) ("Scaling Vision with Sparse Mixture
of Experts") is a Vision Transformer in which some blocks replace their MLP by
a *sparse mixture of experts*: a router sends every token to its top K of E
expert MLPs, and each expert only has room for a fixed number of tokens (its
*capacity*).

Google released V-MoE checkpoints trained with the JAX/Flax code of
[google-research/vmoe](https://github.com/google-research/vmoe). `keras_vmoe`
reads those checkpoints without Flax or TensorFlow and turns them into a
`keras_vmoe.models.VMoEImageClassifier`, a regular Keras 3 model that runs on
JAX, TensorFlow or PyTorch.

In this guide you will:

1. load a vmoe checkpoint with `keras_vmoe.convert.load_vmoe_checkpoint`,
2. check that the converted model reproduces the reference logits,
3. load a released checkpoint from `gs://vmoe_checkpoints/` by name,
4. attach a preprocessor so the model takes raw `uint8` images,
5. fine-tune it on CIFAR-10 with `model.fit`, and read the router metrics
   (`moe_auxiliary_loss`, `moe_dropped_tokens`) that show up in the logs.

So that the guide runs in a few minutes on a laptop CPU, we do not download a
56M-parameter released model. We use a *tiny* checkpoint that was written by
the official vmoe code (random weights, 32x32 inputs, 10 classes) and ships
with the project's test fixtures. Every step is the same for a real checkpoint.
"""

"""
## Setup

Pick a backend with the `KERAS_BACKEND` environment variable (`jax`,
`tensorflow` or `torch`) before importing Keras.

The data and the checkpoint are read from a shared folder that contains
`data/` and `fixtures/`: by default `../shared` next to the repository, or the
folder named by the `KERAS_VMOE_SHARED` environment variable.
Set `KERAS_VMOE_GUIDE_FAST=1` to run the whole guide on a tiny subset (this is
what the test suite does).
"""

import io
import json
import os
import pathlib
import pprint
import time

import keras
import numpy as np
import tensorflow as tf  # Only for `tf.data` input pipelines (a keras-hub dependency).
from PIL import Image

import keras_vmoe
from keras_vmoe.convert import load_vmoe_checkpoint
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import VMoEImageClassifierPreprocessor
from keras_vmoe.models import VMoEImageConverter

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CHECKPOINT_DIR = SHARED / "fixtures" / "vmoe" / "vmoe_tiny_token_choice"
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"

SEED = 0
keras.utils.set_random_seed(SEED)
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, keras_vmoe {keras_vmoe.__version__}")
print("Fast mode:", FAST)

"""
## The checkpoint and its model config

A vmoe checkpoint is a *prefix*: an index file `<prefix>.index` plus one or
more shards `<prefix>.data-0000N-of-0000M`. It holds the parameters only. The
architecture is described separately, by the model config that vmoe's
training configs keep in `config.model`: the keyword arguments of vmoe's
`VisionTransformerMoe`. Our tiny checkpoint comes with that dict as JSON.
"""

with open(CHECKPOINT_DIR / "config.json") as f:
    vmoe_config = json.load(f)
print(json.dumps(vmoe_config, indent=1))
print(sorted(p.name for p in CHECKPOINT_DIR.glob("ckpt.*")))

"""
This is a 4-block V-MoE with hidden size 32 and 8x8 patches. Blocks 1 and 3
are MoE blocks with E=4 experts; every token picks its K=2 best experts, and
each expert has a capacity of `ceil(group_size * K * capacity_factor / E)`
slots, rounded up to a multiple of 4: `ceil(34 * 2 * 1.05 / 4) = 18 -> 20`.

`group_size` matters when you feed the model: vmoe routes tokens in groups of
`group_size` tokens formed over the **whole batch**. A 32x32 image cut into
8x8 patches gives 16 patch tokens plus one class token, 17 tokens, so a group
of 34 tokens is exactly 2 images. The number of images in every batch must
therefore be even.

## Loading the checkpoint

`load_vmoe_checkpoint(prefix, config)` builds the matching Keras model from
the config, checks that every parameter of the checkpoint has a variable of
the same shape (and the other way round), and only then assigns them. The
image size is inferred from the position embedding.
"""

model = load_vmoe_checkpoint(str(CHECKPOINT_DIR / "ckpt"), vmoe_config)
print(type(model).__name__, "with", type(model.backbone).__name__)
print("Input shape:", model.backbone.image_shape, "- MoE blocks:", model.backbone.moe_layers)
print("Parameters:", model.count_params())

"""
## Checking the conversion against the reference

The fixture also stores a few input images and the logits that the official
vmoe implementation computed for them (in eval mode). vmoe models take pixels
in `[-1, 1]`; the converted model applies no preprocessing when it is called
directly, so we feed the stored images as they are.
"""

reference = np.load(CHECKPOINT_DIR / "io.npz")
images, expected_logits = reference["images"], reference["logits"]
logits = model.predict(images, batch_size=len(images), verbose=0)
max_abs_diff = float(np.max(np.abs(logits - expected_logits)))
print(f"{len(images)} images, logits {logits.shape}, max |keras - vmoe| = {max_abs_diff:.2e}")
assert max_abs_diff < 1e-4, "The converted model does not match the vmoe reference."

"""
The difference is at the level of float32 round-off: the Keras model computes
the same function as vmoe, routing included.

Remember the routing groups: with an odd batch, say 3 images, the 51 tokens
do not split into groups of 34. On the JAX and PyTorch backends (and on
TensorFlow the first time a function is traced) the MoE layer stops with

```
ValueError: moe: 3 images x 17 tokens = 51 tokens do not split into routing
groups of group_size=34. Use a batch size whose token count is a multiple of
34, or group_size=None to route each image on its own.
```

while a TensorFlow graph traced for an unknown batch size fails at run time
in the layer's `Reshape`. Keep every batch, the last one included, a multiple
of 2 images.
"""

"""
## Loading a released checkpoint

The checkpoints listed in the
[vmoe README](https://github.com/google-research/vmoe#checkpoints) are
built-in presets of `keras_vmoe`: their names are the names under
`gs://vmoe_checkpoints/`. The first `from_preset` downloads the checkpoint
(with a progress bar), converts it and caches the result as a keras-hub preset
under `~/.keras/keras_vmoe/` (or `$KERAS_VMOE_HOME`); later calls load the
cache. The preset comes with a preprocessor, so `predict` takes raw `uint8`
images of any size.

```python
classifier = VMoEImageClassifier.from_preset("vmoe_s32_last2_ilsvrc2012_randaug_light1")
classifier.predict(images)
```
"""

for name, description in keras_vmoe.presets.list_presets().items():
    print(f"{name}: {description}")

"""
Without network, `from_preset` stops with an error that says which files to
fetch. Download them where you can, e.g. with `gsutil`:

```shell
mkdir -p ~/vmoe_checkpoints
gsutil -m cp "gs://vmoe_checkpoints/vmoe_s32_last2_ilsvrc2012_randaug_light1.*" ~/vmoe_checkpoints/
```

then either set `KERAS_VMOE_CHECKPOINT_MIRROR=~/vmoe_checkpoints` (the preset
is then converted from that folder), or call `load_vmoe_checkpoint` yourself
with the vmoe model config of the checkpoint. The configs of the released
checkpoints are in `keras_vmoe.presets.VMOE_CHECKPOINT_PRESETS`; they are the
`config.model` of vmoe's `vmoe/configs/vmoe_paper/` files as plain dicts:
"""

released_name = "vmoe_s32_last2_ilsvrc2012_randaug_light1"
released_config = keras_vmoe.presets.VMOE_CHECKPOINT_PRESETS[released_name].model_config
pprint.pprint(released_config, width=100, compact=True)

"""
Set the environment variable `VMOE_RELEASED_CHECKPOINT` to the local prefix
(the path without `.index` / `.data-*`) and the cell below loads it. A few
things to keep in mind with real checkpoints:

- The config must describe the checkpoint exactly. A wrong size, a missing
  `representation_size` or a different MoE placement is reported as an error
  naming the offending parameter; nothing is half-loaded.
- vmoe trained with `group_size` = 8 images. The preset configs route each
  image on its own (`group_size: None`) so any batch size works, and use the
  capacity factor vmoe evaluated with (4.0 for the S/32 ILSVRC-2012 runs: no
  token is dropped, so grouping does not change the outputs).
- The `*_ft_ilsvrc2012` checkpoints were fine-tuned at 384x384 and have
  `representation_size=None` and `capacity_factor=1.5` in their configs.
- To fine-tune on a new label set, build a new classifier on `model.backbone`
  with your `num_classes`, as in the next sections.
"""

released_prefix = os.environ.get("VMOE_RELEASED_CHECKPOINT")
if released_prefix:
    released = load_vmoe_checkpoint(released_prefix, released_config)
    print("Loaded", released_prefix, "-", released.count_params(), "parameters")
else:
    print("VMOE_RELEASED_CHECKPOINT is not set: skipping the released checkpoint.")

"""
## Attaching a preprocessor

The converted classifier has no preprocessor: it expects float pixels in
`[-1, 1]`. For training on raw `uint8` images we give it a
`VMoEImageClassifierPreprocessor` whose `VMoEImageConverter` resizes to 32x32
and maps `[0, 255]` to `[-1, 1]` with `pixel * scale + offset`.

A keras-hub task accepts a new preprocessor by plain assignment. After that,
`fit`, `evaluate` and `predict` run it on their inputs; calling the model
directly (`model(x)`) still takes preprocessed pixels.
"""

preprocessor = VMoEImageClassifierPreprocessor(
    VMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
)
model.preprocessor = preprocessor

"""
If you would rather get a fresh head, for example for a different number of
classes, build a new classifier around the loaded backbone; it shares the
converted weights:

```python
model = VMoEImageClassifier(
    backbone=model.backbone, num_classes=10, preprocessor=preprocessor
)
```

Our checkpoint already has a 10-class head, so we keep it.
"""

assert isinstance(model, VMoEImageClassifier)
print("Preprocessor:", type(model.preprocessor).__name__)

"""
## The CIFAR-10 data

The shared data folder has CIFAR-10 as JPEG bytes: every split is one
concatenated byte array plus offsets, and image `i` is
`jpeg[offsets[i]:offsets[i + 1]]`. We decode a random subset with Pillow.
"""


def load_cifar10(split, count, seed=SEED):
    """Decodes `count` random images of a CIFAR-10 split to uint8 arrays."""
    with np.load(CIFAR10) as data:
        jpeg, offsets = data[f"{split}_jpeg"], data[f"{split}_offsets"]
        labels, class_names = data[f"{split}_labels"], data["class_names"]
    indices = np.random.default_rng(seed).permutation(len(labels))[:count]
    images = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
            for i in indices
        ]
    )
    return images, labels[indices].astype("int32"), [str(name) for name in class_names]


BATCH_SIZE = 32  # Even: 2 images per routing group.
NUM_TRAIN = 64 if FAST else 5000
NUM_TEST = 64 if FAST else 2000
EPOCHS = 1 if FAST else 2

x_train, y_train, class_names = load_cifar10("train", NUM_TRAIN)
x_test, y_test, _ = load_cifar10("test", NUM_TEST)
print("train:", x_train.shape, x_train.dtype, "test:", x_test.shape)
print("classes:", class_names)

"""
keras-hub tasks turn NumPy inputs into a `tf.data` pipeline without shuffling
them, so we build the pipeline ourselves: `shuffle` reshuffles every epoch.
Every batch holds an even number of images (all the sizes above are multiples
of the batch size). The pipeline works with every Keras backend.
"""

train_ds = (
    tf.data.Dataset.from_tensor_slices((x_train, y_train))
    .shuffle(len(x_train), seed=SEED)
    .batch(BATCH_SIZE, drop_remainder=True)
)
test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(BATCH_SIZE)

"""
## Fine-tuning

We compile with Adam and a sparse categorical cross-entropy on logits. During
training, each MoE layer also adds its auxiliary load-balancing loss to the
model's losses; Keras includes it in the reported `loss`.
"""

model.compile(
    optimizer=keras.optimizers.Adam(learning_rate=1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)

start = time.perf_counter()
history = model.fit(train_ds, epochs=EPOCHS, verbose=2)
print(f"fit: {time.perf_counter() - start:.1f} s")
for epoch in range(EPOCHS):
    logs = {name: values[epoch] for name, values in history.history.items()}
    print(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items())))

"""
Besides the loss and accuracy, the logs show two router metrics that
`keras_vmoe` classifiers report whenever their backbone has MoE layers:

- `moe_auxiliary_loss`: the auxiliary losses of all MoE layers, summed. For
  this router it is vmoe's *importance* loss plus, in training, its *load*
  loss (each weighted by 0.005 in this config). Both are squared coefficients
  of variation: they are zero when every expert gets the same share of the
  gate mass (importance) and the same chance of being chosen (load). The
  training `loss` already includes this term; the metric lets you watch it.
  A growing value means the router is collapsing onto a few experts.
- `moe_dropped_tokens`: the fraction of tokens that got no expert at all
  because all their K chosen experts were full, averaged over the MoE layers.
  Such a token skips the MLP (only the residual connection carries it).
  It depends on the capacity factor: with 1.05 there is little spare room, so
  a few percent of dropped tokens is normal, especially early in training
  when routing is unbalanced. vmoe evaluates with a larger capacity factor
  for that reason.

Both metrics are averaged over the batches of the epoch, like the loss.
"""

"""
## Evaluation

`evaluate` runs the preprocessor on the raw test images, and reports the same
router metrics in inference mode (no routing noise, so there is no load loss
and the auxiliary loss is the importance loss alone; nothing is added to the
loss in inference).
"""

results = model.evaluate(test_ds, verbose=0, return_dict=True)
print("test:", ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))

"""
`predict` also takes raw images once the preprocessor is attached (again with
an even batch size):
"""

predictions = model.predict(x_test[:8], batch_size=8, verbose=0).argmax(axis=-1)
for predicted, actual in zip(predictions, y_test[:8]):
    print(f"predicted {class_names[predicted]:>10}  actual {class_names[actual]}")

"""
## What to expect

The checkpoint we started from has random weights and only about 67k
parameters, so this is really training a tiny V-MoE from scratch on a few
thousand images. On the JAX backend, on a 2-core CPU machine, a full run of
this guide (5,000 training images, 2 epochs, 2,000 test images) reached a test
accuracy of 33.2%: well above chance (10%), far from what a pretrained V-MoE
reaches.

With a released checkpoint the steps are identical: download,
`load_vmoe_checkpoint`, build a classifier with your `num_classes` on
`model.backbone` and a preprocessor of the checkpoint's image size, compile,
and `fit`. vmoe's fine-tuning configs use SGD with momentum, a
warmup plus cosine learning-rate schedule and a capacity factor of 1.5; use
an `image_size` that matches the checkpoint (224 or 384) and a batch size that
is a multiple of the group size in images.
"""
