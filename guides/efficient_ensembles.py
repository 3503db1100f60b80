"""
Title: Efficient ensembles of experts (E^3): an ensemble for the price of a MoE
Author: keras_vmoe contributors
Date created: 2026/12/04
Last modified: 2026/12/04
Description: Turn a V-MoE into an E^3 ensemble, read its members and its ensemble prediction, measure calibration (NLL, ECE, Brier, a reliability diagram), train it with `fit`, and load vmoe's released `eee_*` checkpoints.
Accelerator: None
"""

"""
## Introduction

["Sparse MoEs meet Efficient Ensembles"](https://arxiv.org/abs/2110.03360)
(Allingham et al., 2022) notices that a sparse MoE is half an ensemble
already: its experts are separate networks. E^3 (efficient ensemble of
experts) makes the rest explicit:

- the batch is **repeated M times** before the first MoE block;
- the E experts split into **M disjoint pools** of E / M, and ensemble member
  m routes only within pool m, with its own router columns;
- the dense blocks and the head are shared, so the members differ exactly
  where the experts are;
- the prediction is the **log of the members' mean probability**, and the
  training loss is the cross-entropy of every member against its image's
  label.

In keras_vmoe an E^3 model is a `VMoEBackbone(ensemble_size=M)` under a
`VMoEImageClassifier`. This guide turns the bundled `vmoe_tiny_cifar10` into
one, looks at its members, measures calibration, trains it, and loads vmoe's
E^3 checkpoints.
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
import tempfile

import keras
import numpy as np

import keras_vmoe
from keras_vmoe.convert import load_vmoe_checkpoint
from keras_vmoe.data import load_cifar10
from keras_vmoe.evaluation import BrierScore
from keras_vmoe.evaluation import ExpectedCalibrationError
from keras_vmoe.evaluation import NegativeLogLikelihood
from keras_vmoe.evaluation import brier_score
from keras_vmoe.evaluation import calibration_bins
from keras_vmoe.evaluation import expected_calibration_error
from keras_vmoe.evaluation import negative_log_likelihood
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import count_flops
from keras_vmoe.models import selected_experts
from keras_vmoe.presets import VMOE_CHECKPOINT_PRESETS
from keras_vmoe.visualization import draw_reliability_diagram

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"
NUM_TEST = 200 if FAST else 10_000
NUM_TRAIN = 64 if FAST else 5_000
OUTPUT = pathlib.Path(tempfile.mkdtemp(prefix="efficient_ensembles_"))
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, fast mode: {FAST}")

test_images, test_labels = load_cifar10(CIFAR10, "test", limit=NUM_TEST)
train_images, train_labels = load_cifar10(CIFAR10, "train", limit=NUM_TRAIN)


def report(name, model):
    """Top-1 and the three calibration measures of the model's prediction."""
    prediction = model.predict(test_images, batch_size=100, verbose=0)  # log-probabilities or logits
    print(
        f"{name:<6} top-1 {np.mean(prediction.argmax(-1) == test_labels):.4f}  "
        f"NLL {negative_log_likelihood(test_labels, prediction):.4f}  "
        f"ECE {expected_calibration_error(test_labels, prediction):.4f}  "
        f"Brier {brier_score(test_labels, prediction):.4f}  "
        f"{count_flops(model)['total'] / 1e6:.1f} MFLOPs/image"
    )
    return prediction


"""
## From a V-MoE to an E^3 ensemble

`vmoe_tiny_cifar10` has 8 experts in blocks 3 and 5, each token choosing one
(K = 1). `keras_vmoe.upcycle(..., moe_layers=(), ensemble_size=2)` keeps
every weight and makes it an ensemble of two members: member 0 routes within
experts 0-3, member 1 within experts 4-7, each with its columns of the
router kernel (vmoe's E^3 fine-tuning configs reshape the (D, E) kernel to
(D, M, E / M) the same way). From a dense model, give `moe_layers` as for any
upcycling.
"""

vmoe = VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
e3 = keras_vmoe.upcycle(
    vmoe, num_experts=8, moe_layers=(), num_selected_experts=1, batch_priority=True, ensemble_size=2
)
print(f"V-MoE {vmoe.count_params():,} parameters; E^3 {e3.count_params():,} (the same weights)")
vmoe_prediction = report("V-MoE", vmoe)
e3_prediction = report("E^3", e3)

"""
The FLOPs grow because blocks 3 to 5 and the head now run twice per image;
the parameters do not change. Right after the conversion each member sees
only half of the experts its router was trained to choose from, so the
ensemble starts a little behind; a short fine-tuning (below) lets the
routers adapt.

## The members and the ensemble

Calling the model gives its raw output: M rows per image, row b * M + m is
member m of image b (vmoe's layout). `predict` gives the ensemble's log of
the members' mean probability, and `predict_members` the members' logits,
(images, M, classes).
"""

images = test_images[:8]
raw = keras.ops.convert_to_numpy(e3(e3.preprocessor(images)))
members = e3.predict_members(images, verbose=0)
print("raw output", raw.shape, "members", members.shape, "ensemble", e3.predict(images, verbose=0).shape)
agreement = np.mean(members[:, 0].argmax(-1) == members[:, 1].argmax(-1))
print(f"the two members agree on {agreement:.0%} of these images")

"""
Which experts each member used: `selected_experts` returns one row per
member. Member 0 never leaves experts 0-3 and member 1 never leaves 4-7.
"""

chosen = selected_experts(e3.backbone, e3.preprocessor(images))
for block, experts in chosen.items():
    per_member = experts.reshape(len(images), 2, -1, 8).sum(axis=(0, 2))  # tokens per (member, expert)
    print(f"block {block}: member 0 -> {per_member[0].tolist()}, member 1 -> {per_member[1].tolist()}")

"""
## Calibration

`keras_vmoe.evaluation` has negative log-likelihood, expected calibration
error (15 equal-width confidence bins, as in the E^3 paper and
uncertainty-baselines) and the Brier score, as functions on arrays (above)
and as Keras metrics for `compile`. `draw_reliability_diagram` shows the
bins: per bin, the accuracy against the mean confidence.
"""

for name, prediction in (("vmoe", vmoe_prediction), ("e3", e3_prediction)):
    picture = draw_reliability_diagram(
        *calibration_bins(test_labels, prediction), title=f"{name}: CIFAR-10 test"
    )
    picture.save(OUTPUT / f"{name}-reliability.png")
print(f"reliability diagrams in {OUTPUT}")

"""
## Training an E^3 model with `fit`

`fit` trains with vmoe's ensemble loss: the compiled loss on every member
against its image's label (labels repeated M times), plus the MoE layers'
auxiliary losses. The compiled metrics are computed on the ensemble's
prediction, so the calibration metrics apply directly.
"""

e3.compile(
    optimizer=keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.05),
    metrics=[
        "sparse_categorical_accuracy",
        NegativeLogLikelihood(),
        ExpectedCalibrationError(),
        BrierScore(),
    ],
)
history = e3.fit(train_images, train_labels, batch_size=32 if FAST else 128, epochs=1, verbose=2)
print({name: round(values[-1], 4) for name, values in history.history.items()})
report("E^3", e3)

"""
## A measured comparison in miniature

`benchmarks/efficient_ensembles.py` continues both arms from
`vmoe_tiny_cifar10` for the same number of steps on CIFAR-10 and evaluates
them on the 10,000 test images. Its results on this project's 2-core CPU:
"""

results_file = REPO_ROOT / "benchmarks" / "results" / "efficient_ensembles-cpu2.json"
for result in json.loads(results_file.read_text()):
    after = result["after"]
    print(
        f"{result['arm']:<5} {result['flops_per_image'] / 1e6:6.1f} MFLOPs  top-1 {after['test_top1']:.4f}  "
        f"NLL {after['nll']:.4f}  ECE {after['ece']:.4f}  Brier {after['brier']:.4f}"
    )

"""
At this scale the paper's claim does not show: one epoch wins back only part
of the point of top-1 that the conversion cost, and the ensemble is less
well calibrated. The preset is underconfident (label smoothing and mixup
in its recipe), and averaging the members' probabilities makes its
predictions softer still, so every reliability bin moves further above the
diagonal. The paper trains its E^3 models as ensembles from the start, at
ImageNet scale.

## vmoe's E^3 checkpoints

google-research/vmoe released two E^3 models, both built-in preset names:
`eee_s32_last2_ilsvrc2012` (ImageNet, 224x224) and
`eee_s32_last2_ilsvrc2012_ft_cifar100` (fine-tuned on CIFAR-100, 128x128).
`VMoEImageClassifier.from_preset` downloads, converts and caches them like
the V-MoE checkpoints; offline it names the files to fetch. Any vmoe E^3
checkpoint loads with `load_vmoe_checkpoint` and its config; here the tiny
one the parity tests use.
"""

for name, preset in VMOE_CHECKPOINT_PRESETS.items():
    if name.startswith("eee_"):
        print(f"{name}: {preset.image_size}x{preset.image_size}; {preset.description}")
# classifier = VMoEImageClassifier.from_preset("eee_s32_last2_ilsvrc2012_ft_cifar100")  # needs gs:// access

fixture = SHARED / "fixtures" / "vmoe" / "eee_tiny"
if fixture.is_dir():
    tiny = load_vmoe_checkpoint(str(fixture / "ckpt"), json.loads((fixture / "config.json").read_text()))
    io = np.load(fixture / "io.npz")
    difference = np.max(np.abs(tiny.predict(io["images"], verbose=0) - io["ensemble_log_probs"]))
    print(f"eee_tiny: ensemble of {tiny.ensemble_size}; max |log-prob difference| from vmoe {difference:.2e}")

"""
## Modality pools in LIMoE

The same routing within pools of experts gives `LIMoEBackbone` an option for
modality-specific experts (`modality_expert_pools=True`): image tokens route
only to the first half of the experts and text tokens only to the second,
how VL-MoE separates its vision and language experts.
"""
