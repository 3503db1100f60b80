"""
Title: The bundled CIFAR-10 presets: classify, look at the routing, fine-tune
Author: keras_vmoe contributors
Date created: 2026/11/22
Last modified: 2026/11/22
Description: Load the dense ViT, V-MoE and Soft MoE presets that ship with keras_vmoe, compare them at equal FLOPs, see which expert each patch goes to, and fine-tune one with `fit`.
Accelerator: None
"""

"""
## Introduction

keras_vmoe ships three small presets inside the package, trained from scratch
on CIFAR-10 by the recipes next to them (`presets/<name>/recipe.py`):

- `vit_tiny_cifar10`: a dense ViT, 6 blocks of width 192 on 4x4 patches;
- `vmoe_tiny_cifar10`: the same ViT whose blocks 3 and 5 hold a V-MoE layer
  of 8 experts, each token routed to its top-1 expert;
- `soft_moe_tiny_cifar10`: the same ViT with a Soft MoE layer of 8 experts
  with 8 slots each in blocks 3 and 5.

The MoE layers process 64 slots per image, as many as the dense MLP
processes tokens, so the three cost the same per token: the papers'
comparison in miniature. They load offline by name, from any directory.

In this guide we list the presets, measure them on CIFAR-10 test images,
count their FLOPs, look at how the V-MoE routes, and fine-tune it.
"""

"""
## Setup

Choose the backend with `KERAS_BACKEND` (`jax`, `tensorflow` or `torch`).
CIFAR-10 is read from `data/cifar10_jpeg.npz` in the shared folder: by
default `../shared` next to the repository, or the folder named by
`KERAS_VMOE_SHARED`. `KERAS_VMOE_GUIDE_FAST=1` runs the guide on a few
hundred images (used by the test suite).
"""

import os
import pathlib

import keras
import numpy as np

import keras_vmoe
from keras_vmoe.data import CIFAR10_CLASS_NAMES
from keras_vmoe.data import load_cifar10
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import count_flops
from keras_vmoe.models import expert_assignments
from keras_vmoe.visualization import draw_routing_map

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"
NUM_TEST = 300 if FAST else 10_000
NUM_FINE_TUNE = 128 if FAST else 5_000
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, fast mode: {FAST}")

"""
## The presets

`keras_vmoe.presets.preset_infos()` lists every built-in name (the `keras-vmoe
presets` command prints the same): the bundled ones with the accuracy their
recipe measured on the 10,000 test images, and the released V-MoE checkpoints,
which download on first use.
"""

for info in keras_vmoe.presets.preset_infos():
    accuracy = f"top-1 {info.test_top1:.4f}" if info.test_top1 else ""
    print(f"{info.name:<52} {info.params / 1e6:6.1f}M  offline={info.offline!s:<5} {accuracy}")

"""
## Classify CIFAR-10 test images

A task's `predict` takes raw uint8 images: its preprocessor scales them to
[-1, 1] (and would resize other sizes to 32x32). We decode test images and
measure top-1 accuracy of each preset, next to its parameters and forward
FLOPs per image (`count_flops` counts the matrix products from the built
model: attention, MLPs or the experts' slots, routers, head).
"""

images, labels = load_cifar10(CIFAR10, "test", limit=None if not FAST else NUM_TEST)
print(f"{len(images)} test images, {images.dtype}, {images.shape[1:]}")

PRESETS = {
    "vit_tiny_cifar10": VMoEImageClassifier,
    "vmoe_tiny_cifar10": VMoEImageClassifier,
    "soft_moe_tiny_cifar10": SoftMoEImageClassifier,
}
classifiers = {}
print(f"{'preset':<24}{'params':>10}{'MFLOPs/image':>14}{'top-1':>8}")
for name, task in PRESETS.items():
    classifier = task.from_preset(name)
    classifiers[name] = classifier
    logits = classifier.predict(images, batch_size=250, verbose=0)
    accuracy = np.mean(np.argmax(logits, axis=-1) == labels)
    flops = count_flops(classifier)["total"]
    print(f"{name:<24}{classifier.count_params():>10,}{flops / 1e6:>14.1f}{accuracy:>8.4f}")

"""
The MoE presets hold 2.5x the parameters of the dense one for about the same
FLOPs: the V-MoE adds only its router (0.1%), the Soft MoE its dispatch and
combine products (2.6%). At this tiny scale, trained for 100 epochs on
50,000 images, the extra experts do not buy accuracy: all three land near
82%. The papers' gains from experts appear with far more data and compute;
the presets show the mechanics, not the scaling law.

## Where do the tokens go?

`expert_assignments(backbone, pixels)` returns, for each MoE block, the
expert each token is processed by (eval mode, as `predict` routes), with -1
for a token the V-MoE dropped because its expert was full. It takes model
inputs, so we run the preprocessor first.
"""

vmoe = classifiers["vmoe_tiny_cifar10"]
pixels = vmoe.preprocessor(images[:500])
assignments = expert_assignments(vmoe.backbone, pixels)
for block, experts in assignments.items():
    counts = np.bincount(experts.ravel() + 1, minlength=9)
    print(
        f"block {block}: dropped {counts[0] / experts.size:.1%} of the tokens; "
        f"tokens per expert {counts[1:].tolist()}"
    )

"""
With capacity factor 1.0 and each image routed on its own, an expert has 8
slots per image; when more than 8 of the 64 tokens choose it, Batch Priority
Routing keeps the ones the router is surest of, and the rest skip the MLP
through the residual connection.

Do experts specialise by class? In its large models the V-MoE paper finds
that deeper MoE layers route partly by class. We count, for each class, the
share of its tokens each expert of the last MoE block takes.
"""

last_block = max(assignments)
label_subset = labels[:500]
print(f"share of each class's tokens per expert in block {last_block}:")
print(" " * 12 + "".join(f"{f'e{e}':>6}" for e in range(8)))
for class_index, class_name in enumerate(CIFAR10_CLASS_NAMES):
    tokens = assignments[last_block][label_subset == class_index].ravel()
    if tokens.size:
        shares = np.bincount(tokens[tokens >= 0], minlength=8) / tokens.size
        print(f"{class_name:<12}" + "".join(f"{share:>6.2f}" for share in shares))

"""
In these tiny presets the shares come out close to uniform: the balancing
losses and the per-image capacity spread every class over all experts. The
picture below suggests they split tokens by local content instead (sky,
edges, object parts).

`draw_routing_map` draws the same decisions over the images, one panel per
MoE block (`keras-vmoe classify --routing-map FILE.png IMAGE...` does this for
your own photos).
"""

shown = [int(np.flatnonzero(label_subset == c)[0]) for c in (0, 3, 7, 8) if (label_subset == c).any()]
picture = draw_routing_map(
    [images[i] for i in shown],
    {f"block {b}": experts[shown] for b, experts in assignments.items()},
    grid_shape=(8, 8),
    num_experts=8,
    captions=[CIFAR10_CLASS_NAMES[labels[i]] for i in shown],
    title="vmoe_tiny_cifar10 on CIFAR-10 test images",
)
output = pathlib.Path(os.environ.get("KERAS_VMOE_GUIDE_OUTPUT", "/tmp")) / "cifar10_routing_map.png"
picture.save(output)
print(f"routing map: {output} ({picture.size[0]}x{picture.size[1]})")

"""
## Fine-tune with `fit`

A preset is an ordinary keras-hub task: `fit` on raw uint8 images goes
through the preprocessor, and the logs show the MoE layers' auxiliary loss
and the share of dropped tokens next to the loss. Here we fine-tune the V-MoE
for one epoch on CIFAR-10 training images with a small learning rate.
"""

train_images, train_labels = load_cifar10(CIFAR10, "train", limit=NUM_FINE_TUNE)
vmoe.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=1e-5, weight_decay=0.05),
    metrics=["sparse_categorical_accuracy"],
)
history = vmoe.fit(train_images, train_labels, batch_size=64, epochs=1, verbose=2)
print({name: round(values[-1], 4) for name, values in history.history.items()})
logits = vmoe.predict(images, batch_size=250, verbose=0)
print(f"top-1 after fine-tuning: {np.mean(np.argmax(logits, axis=-1) == labels):.4f}")

"""
`vmoe.save_to_preset(folder)` writes the result as a preset that
`VMoEImageClassifier.from_preset(folder)` loads again.

## Train a preset yourself

Each preset folder holds the script that trained it. It takes a path to
CIFAR-10 and writes the preset files and `metrics.json` (top-1 on the 10,000
test images, parameters, FLOPs per image, training time and hardware):

```shell
python presets/vmoe_tiny_cifar10/recipe.py --cifar10 ../shared/data/cifar10_jpeg.npz \
    --output my_vmoe_tiny_cifar10
```

The bundled presets were trained this way on one H100 (about 8 minutes
each, the three at once); the recipe runs unchanged on a CPU, much more
slowly.
"""
