"""
Title: Training a V-MoE with its experts sharded over a device mesh
Author: keras_vmoe contributors
Date created: 2026/11/22
Last modified: 2026/11/22
Description: Expert parallelism and data parallelism with keras.distribution: shard the experts of a V-MoE over an "expert" mesh axis, train it with fit, and read from the compiled program what the devices exchange.
Accelerator: None
"""

"""
## Introduction

A Mixture-of-Experts layer holds E expert MLPs, but each token visits only a
few of them. When the experts no longer fit one device, V-MoE
([Riquelme et al., 2021](https://arxiv.org/abs/2106.05974)) shards them: each
device keeps E / n experts, and the tokens travel to their experts' devices
and back. In google-research/vmoe this is done with `pjit` over an `expert`
mesh axis: the dispatched slots, laid out (groups, experts, capacity, D),
are sharded by group on one side of a transpose and by expert on the other,
and the compiler turns that transpose into one **all-to-all**.

Keras 3 already has the engine for this: `keras.distribution` (`DeviceMesh`,
`LayoutMap`, `ModelParallel`), which compiles to GSPMD on JAX.
`keras_vmoe.distribution.get_layout_map` writes the layouts:

- every expert weight bank (`kernel_0`, `bias_0`, `kernel_1`, `bias_1`, E
  first) is sharded over the `expert` axis;
- the dispatched `(E, slots, D)` activations get a layout too. With it, each
  MoE layer routes and dispatches its own share of the groups on each device,
  exchanges the slots with one all-to-all on the expert axis, runs the experts
  where their weights live, and sends the outputs back with another.

In this guide we train a small V-MoE on CIFAR-10 on a mesh of 2 x 4 devices
(data parallel over `batch`, experts over `expert`), check it computes what
the same model computes on one device, and read the collectives of the
compiled train step.
"""

"""
## Setup

`keras.distribution` shards models on the JAX backend only (Keras 3.15). We
need 8 devices; without 8 accelerators, XLA can split the CPU into 8 virtual
devices, which is how this guide runs anywhere. The flag must be set before
JAX starts, so before importing Keras.

CIFAR-10 is read from `data/cifar10_jpeg.npz` in the shared folder (by
default `../shared` next to the repository, or `KERAS_VMOE_SHARED`).
`KERAS_VMOE_GUIDE_FAST=1` runs the guide on a few hundred images (used by
the test suite; its accuracies mean nothing).
"""

import os
import pathlib
import sys

BACKEND = os.environ.get("KERAS_BACKEND", "jax")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import keras
import numpy as np
import tensorflow as tf  # Only for the tf.data input pipeline (a keras-hub dependency).

import keras_vmoe
from keras_vmoe.data import load_cifar10
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"
NUM_TRAIN = 256 if FAST else 10_000
NUM_TEST = 256 if FAST else 2_000
EPOCHS = 1 if FAST else 3
BATCH_SIZE = 64
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, fast mode: {FAST}")

"""
On TensorFlow and PyTorch there is nothing to shard with: TensorFlow accepts a
`ModelParallel` but leaves every variable whole on one device, and PyTorch has
no `keras.distribution` backend at all (`list_devices()` fails). The models
and their weights are the same on every backend, so train with experts
sharded on JAX and use the weights anywhere. For data parallelism alone (every
device holding all the experts), TensorFlow users can build and `fit` the
model inside a `tf.distribute.MirroredStrategy` scope.
"""

if keras.backend.backend() != "jax":
    print(
        "Expert parallelism needs keras.distribution, which shards on JAX only. "
        "Rerun with KERAS_BACKEND=jax; see the README's 'Distributed training' section."
    )
    sys.exit(0)

devices = keras.distribution.list_devices()
print(f"{len(devices)} devices: {devices}")

"""
One caveat of the virtual CPU devices. With `fit(verbose=0)` or
`verbose=2` nothing waits for a step to finish before the next one is
launched, and on this 2-core machine XLA's CPU runtime then deadlocked in a
collective after some tens of steps (devices waiting for each other at
different steps), for a dense ViT just as for the V-MoE. Waiting for every
step avoids it. This is a workaround for virtual CPU devices; drop it on
accelerators.
"""


class WaitForEachStep(keras.callbacks.Callback):
    """Blocks until each train / test / predict step has finished."""

    def _wait(self, batch, logs=None):
        keras.tree.map_structure(keras.ops.convert_to_numpy, logs)

    on_train_batch_end = on_test_batch_end = on_predict_batch_end = _wait


wait = [WaitForEachStep()]

"""
## The mesh and the layout map

Eight devices in a 2 x 4 mesh: the batch is split in two along `batch`
(data parallelism), the experts in four along `expert` (expert parallelism).
With 8 experts each device holds 2 of them.
"""

mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "expert"), devices=devices)
layout_map = keras_vmoe.distribution.get_layout_map(mesh, expert_axis="expert", batch_axis="batch")
for key in layout_map:
    print(f"{key:<36} {layout_map[key].axes}")
distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")

"""
Keys are regular expressions matched against variable paths (and against
`<MoE layer path>/dispatched` for the slots). Everything they do not match,
here the attention, the dense MLPs, the routers and the head, is replicated.
`get_layout_map(..., model_axis="expert")` would also shard attention heads
and dense MLP units over an axis, Megatron style.

## A V-MoE built inside the distribution

A small V-MoE for 32x32 images: 4x4 patches (64 tokens), 2 blocks of width
64, the second one a MoE layer of 8 experts with top-1 routing and Batch
Priority Routing (kept small so that the guide compiles quickly; the preset
loaded at the end is bigger). Each image is its own routing group, so a
batch of 64 images makes 64 groups: 8 per device. Whatever is created inside the scope is laid out by
the distribution.
"""


def build_vmoe():
    backbone = VMoEBackbone(
        image_shape=(32, 32, 3),
        patch_size=4,
        num_layers=2,
        hidden_dim=64,
        mlp_dim=128,
        num_heads=4,
        pooling="gap",
        use_class_token=False,
        moe_layers=(1,),
        num_experts=8,
        num_selected_experts=1,
        batch_priority=True,
    )
    return VMoEImageClassifier(backbone, num_classes=10)


keras.utils.set_random_seed(0)
with distribution.scope():
    model = build_vmoe()
    # Every key matches something, and every sharded dimension splits evenly.
    keras_vmoe.distribution.validate_layout_map(layout_map, model)

kernel = model.backbone.get_layer("encoder_block_1").mlp.kernel_0
print(f"kernel_0 of block 1: {tuple(kernel.shape)}, sharded {kernel.value.sharding.spec}")
for shard in kernel.value.addressable_shards[:3]:
    print(f"  {shard.device}: experts {shard.index[0]}, shape {shard.data.shape}")

"""
Each device holds experts `2k` and `2k + 1` of every bank; the two devices of
a column of the mesh (the same expert shard, different batch shards) hold the
same experts.

## Training with `fit`

Nothing changes in the training code: `fit` splits every batch over the
`batch` axis and the compiled step does the rest. Pixels go from `[0, 255]`
to `[-1, 1]`, as vmoe trains; AdamW with a linear warmup and a cosine decay.
"""

x_train, y_train = load_cifar10(CIFAR10, "train", limit=NUM_TRAIN)
x_test, y_test = load_cifar10(CIFAR10, "test", limit=NUM_TEST)
x_train = x_train.astype("float32") / 127.5 - 1.0
x_test = x_test.astype("float32") / 127.5 - 1.0
# The archive (and so the subset) is sorted by class, and keras-hub tasks feed
# NumPy inputs to `fit` in order: shuffle every epoch with tf.data.
train_dataset = (
    tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=0).batch(BATCH_SIZE)
)

steps = EPOCHS * int(np.ceil(len(x_train) / BATCH_SIZE))
schedule = keras.optimizers.schedules.CosineDecay(
    initial_learning_rate=0.0,
    warmup_target=1e-3,
    warmup_steps=max(1, steps // 10),
    decay_steps=max(1, steps - steps // 10),
    alpha=0.01,
)
with distribution.scope():
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
    )
    model.fit(train_dataset, epochs=EPOCHS, verbose=2, callbacks=wait)
    results = model.evaluate(
        x_test, y_test, batch_size=BATCH_SIZE, verbose=0, return_dict=True, callbacks=wait
    )
print(f"test accuracy on {NUM_TEST} images: {results['sparse_categorical_accuracy']:.4f}")

"""
The logs show the routers' `moe_auxiliary_loss` and `moe_dropped_tokens`
beside the loss, as on one device.

## The same function as on one device

Sharding changes where things are computed, not what. A copy of the trained
model on one device (no distribution) gives the same logits. (The test suite
also checks that five `fit` steps give the single-device losses, with the
routing noise on.)
"""

single_device = build_vmoe()
single_device.set_weights(model.get_weights())
with distribution.scope():
    sharded_logits = model.predict(x_test[:BATCH_SIZE], batch_size=BATCH_SIZE, verbose=0, callbacks=wait)
single_logits = single_device.predict(x_test[:BATCH_SIZE], batch_size=BATCH_SIZE, verbose=0)
print(f"max |logits difference|: {np.abs(sharded_logits - single_logits).max():.2e}")

"""
## What the devices exchange

`keras_vmoe.distribution.step_collectives` compiles the model's train step
on a batch, as `fit` does, and reads the collectives from the compiled HLO.
All numbers are per device and per step.
"""

with distribution.scope():
    report = keras_vmoe.distribution.step_collectives(
        model, x_train[:BATCH_SIZE], y_train[:BATCH_SIZE], step="train"
    )
print(report.table())
print(report.details())

"""
A full run of this guide (10,000 training images, 3 epochs, this 2-core
machine's CPU split into 8 devices) reached 42.2% on 2,000 test images, the
sharded and the single-device logits differed by 7e-7, and it printed these
collectives for one train step on a batch of 64 images (per device):

| collective | ops | buffer bytes / device | sent bytes / device |
|---|---|---|---|
| all-to-all | 4 | 524,288 | 393,216 |
| all-gather | 2 | 1,048,576 | 786,432 |
| all-reduce | 2 | 368,184 | 369,726 |
| reduce-scatter | 0 | 0 | 0 |
| collective-permute | 0 | 0 | 0 |
| total | 8 | 1,941,048 | 1,549,374 |

("Sent" counts what one device sends with the usual algorithms: 3/4 of an
all-to-all or all-gather buffer among 4 devices, about twice the buffer for
an all-reduce.) Read it for the one MoE layer:

- **4 all-to-alls**: the dispatch and the combine, and their transposes for
  the gradients, each among the 4 devices of the expert axis. Each moves one
  device's slots: 8 groups x 8 experts x 8 slots (capacity) x 64 features in
  float32, 128 KiB, of which 3/4 leave the device. These are the token
  exchanges.
- **2 all-gathers**: Keras lays activations out over the `batch` axis only,
  so the layer's input is replicated over the `expert` axis; the layer works
  on a quarter of it (each device keeps its own 8 groups, no data moves) and
  gathers its output back over the 4 expert devices: a batch shard's 32
  images x 64 tokens x 64 features, 512 KiB. The backward pass gathers the
  gradient of the layer's input the same way.
- **2 all-reduces**: the gradients. Replicated weights and the expert banks
  are summed over the `batch` axis (data parallelism; each expert lives on one
  column of the mesh), the router's over all 8 devices (each device routed its
  own groups).

No expert weight is gathered. For comparison, the same step with the
experts sharded but without the layout of the dispatched slots (delete the
`dispatched` key) compiled to 13 collectives sending 3,254,648 bytes per
device: all-to-alls that split the hidden dimension of all the tokens
(`f32[2048,1,32]` pieces), token-sized all-reduces over the expert axis and
collective-permutes. Under a distribution the layers also route with a
sort-based top-k and per-group scatters, which the compiler splits by group:
XLA's TopK and a scatter over all groups were otherwise gathered onto every
device.

The all-gathers are the price of Keras' data layout on a 2-D mesh. On a 1-D
mesh whose one axis holds both the data and the experts (vmoe's layout when
every device holds E / n experts: `DeviceMesh((8,), ("batch",))` and
`get_layout_map(mesh, expert_axis="batch", batch_axis="batch")`), the layers
need no all-gather: the test suite's predict step there has two all-to-alls
and nothing else.

## Loading pretrained models into the mesh

Presets and converted checkpoints load the same way: create them inside the
scope, and their weights are assigned to the sharded variables. The bundled
CIFAR-10 V-MoE has 8 experts in blocks 3 and 5.
"""

with distribution.scope():
    classifier = VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
    pixels, labels = load_cifar10(CIFAR10, "test", limit=BATCH_SIZE)
    predictions = classifier.predict(pixels, batch_size=BATCH_SIZE, verbose=0, callbacks=wait)
    predictions = predictions.argmax(-1)
bank = classifier.backbone.get_layer("encoder_block_3").mlp.kernel_0.value
print(f"preset kernel_0 {bank.shape}, per device {bank.addressable_shards[0].data.shape}")
print(f"preset accuracy on {BATCH_SIZE} test images: {np.mean(predictions == labels):.3f}")

"""
`keras_vmoe.convert.load_vmoe_checkpoint(prefix, config)` inside the scope
does the same for a google-research/vmoe checkpoint.

## Notes

- The expert axis size must divide `num_experts` (the layer says so when it
  is built), and the routing groups of a batch must split evenly over the
  devices (groups % (batch shards x expert shards) == 0) for the exchange; a
  batch that does not (a last, smaller batch) runs as on one device: same
  result, more traffic.
- `validate_layout_map(layout_map, model)` catches keys that match nothing;
  Keras itself would silently replicate those variables.
"""
