"""
Title: Evaluating MoE models as the papers do: PGD and expert stability, few-shot transfer, choosing presets
Author: keras_vmoe contributors
Date created: 2026/12/03
Last modified: 2026/12/03
Description: Attack the bundled presets with PGD and watch their experts, measure few-shot transfer to Fashion-MNIST, rank presets with a kNN proxy and ensemble them greedily.
Accelerator: None
"""

"""
## Introduction

Accuracy on the training distribution is one number. The papers of this line
measure models in three more ways, and `keras_vmoe.evaluation` gives each of
them to every model of the zoo, on JAX, TensorFlow and PyTorch:

- **Adversarial robustness** ("On the Adversarial Robustness of Mixture of
  Experts", Puigcerver et al.): attack the model with PGD at equal compute,
  and measure how stable each MoE layer's choice of experts stays (the
  intersection over union of each token's experts before and after).
- **Few-shot linear transfer** (V-MoE, Soft MoE, E³ papers): freeze the
  model, fit a closed-form ridge regression on k examples per class of a new
  task, report test accuracy for k in {1, 5, 10, 25}.
- **Choosing and combining pre-trained models** ("Scalable Transfer Learning
  with Expert Models", "Deep Ensembles for Low-Data Transfer Learning"): rank
  candidates by the kNN accuracy of their features on the target data, and
  build an ensemble greedily on validation cross-entropy.
"""

"""
## Setup

CIFAR-10 comes from `data/cifar10_jpeg.npz` in the shared folder (`../shared`
next to the repository, or `KERAS_VMOE_SHARED`); Fashion-MNIST from
`apt-get install dataset-fashion-mnist` (when it is absent, the guide uses
CIFAR-10 as the transfer target instead). `KERAS_VMOE_GUIDE_FAST=1` runs on a
few images (used by the test suite; its numbers mean nothing).
"""

import os
import pathlib

import keras
import numpy as np

from keras_vmoe.data import load_cifar10
from keras_vmoe.data import load_fashion_mnist
from keras_vmoe.data.fashion_mnist import FASHION_MNIST_DIR
from keras_vmoe.evaluation import class_probabilities
from keras_vmoe.evaluation import evaluate_robustness
from keras_vmoe.evaluation import fewshot_accuracy
from keras_vmoe.evaluation import greedy_ensemble
from keras_vmoe.evaluation import model_inputs
from keras_vmoe.evaluation import pgd_attack
from keras_vmoe.evaluation import pre_logits
from keras_vmoe.evaluation import rank_by_knn
from keras_vmoe.models import VisionTransformerImageClassifier
from keras_vmoe.models import count_flops

FAST = os.environ.get("KERAS_VMOE_GUIDE_FAST") == "1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_VMOE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10_jpeg.npz"
NUM_ATTACKED = 16 if FAST else 500
NUM_TRANSFER_TRAIN = 250 if FAST else 2_500
NUM_TRANSFER_TEST = 100 if FAST else 2_000
print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, fast mode: {FAST}")

"""
## Three presets of equal compute

The bundled presets are a dense ViT, a V-MoE (8 experts in blocks 3 and 5,
top-1) and a Soft MoE (8 experts of 8 slots in the same blocks), all trained
on CIFAR-10 with the same recipe, and they cost the same FLOPs per image
within 3%.
"""

PRESETS = ("vit_tiny_cifar10", "vmoe_tiny_cifar10", "soft_moe_tiny_cifar10")
classifiers = {name: VisionTransformerImageClassifier.from_preset(name) for name in PRESETS}
for name, classifier in classifiers.items():
    print(f"{name:<24} {count_flops(classifier)['total'] / 1e9:.3f} GFLOPs per image")

"""
## PGD and the stability of the experts

`evaluate_robustness` takes raw images, maps them to the model's inputs with
its image converter (the presets' [-1, 1]), and runs vmoe's PGD: `updates`
steps of `epsilon / updates` along the sign of the loss gradient. Epsilon is
in input units, so `2 / 255` is one pixel level. Two choices differ from
vmoe and are on by default: each step is clipped to the valid pixels, and
each image keeps its highest-loss iterate, so the attack never lowers an
image's loss (`keep_best=False, clip=False` gives vmoe's exact last iterate).
"""

images, labels = load_cifar10(CIFAR10, "test", limit=NUM_ATTACKED)
results = {}
for name, classifier in classifiers.items():
    results[name] = evaluate_robustness(classifier, images, labels, epsilon=2 / 255, num_updates=10)
    r = results[name]
    print(
        f"{name:<24} top-1 {r.clean_accuracy:.3f} -> {r.adversarial_accuracy:.3f}, "
        f"loss {r.clean_loss:.3f} -> {r.adversarial_loss:.3f}, expert IoU {r.expert_iou}"
    )

"""
`expert_iou` maps each MoE block to the mean, over tokens and images, of
|A & B| / |A | B|, where A and B are the experts a token is sent to before and
after the attack. For Soft MoE every token mixes every expert, so the sets
are each token's main expert, and the IoU is the fraction of tokens whose
main expert did not change.

`pgd_attack` is the attack alone, on one batch of model inputs; every
adversarial image stays within epsilon of its input:
"""

vmoe = classifiers["vmoe_tiny_cifar10"]
x = model_inputs(vmoe, images[:8])
adversarial = pgd_attack(vmoe, x, labels[:8], epsilon=2 / 255, num_updates=10, input_range=(-1.0, 1.0))
print("largest change:", float(np.abs(adversarial - x).max()), "<= epsilon", 2 / 255)

"""
## Few-shot transfer to Fashion-MNIST

Fashion-MNIST's grey clothing photographs are nothing like the CIFAR-10 the
presets learned. `pre_logits` gives the frozen features (the pooled backbone
output, before the head), and `fewshot_accuracy` fits vmoe's closed-form
ridge regression on k examples per class, over several random draws, with
vmoe's regularisers.
"""

if FASHION_MNIST_DIR.is_dir():
    target = "Fashion-MNIST"
    train = load_fashion_mnist(FASHION_MNIST_DIR, "train", limit=NUM_TRANSFER_TRAIN)
    test = load_fashion_mnist(FASHION_MNIST_DIR, "test", limit=NUM_TRANSFER_TEST)
else:
    target = "CIFAR-10"
    train = load_cifar10(CIFAR10, "train", limit=NUM_TRANSFER_TRAIN)
    test = load_cifar10(CIFAR10, "test", limit=NUM_TRANSFER_TEST)
shots = (1, 5, 10) if FAST else (1, 5, 10, 25)
features = {}
for name, classifier in classifiers.items():
    features[name] = (pre_logits(classifier, train[0]), pre_logits(classifier, test[0]))
    result = fewshot_accuracy(features[name][0], train[1], features[name][1], test[1], shots=shots)
    print(f"{name:<24} " + ", ".join(f"{k}-shot {result[k]['accuracy']:.3f}" for k in shots))

"""
## Which preset to fine-tune? A kNN proxy

Fine-tuning every candidate is expensive; the accuracy of a k-nearest-
neighbour classifier on their frozen features is a cheap proxy for which one
will transfer best.
"""

for place, (name, accuracy) in enumerate(rank_by_knn(features, train[1], test[1], k=5), 1):
    print(f"{place}. {name:<24} 5-NN accuracy on {target}: {accuracy:.3f}")

"""
## A greedy ensemble

Given each model's predicted probabilities on a validation set,
`greedy_ensemble` starts from the best model and keeps adding the one that
lowers the ensemble's cross-entropy most (a model may join twice, weighing
double), stopping when nothing helps. Here on CIFAR-10, whose classes the
presets predict: half the attacked images choose, the other half test.
"""

probabilities = {name: class_probabilities(c, images) for name, c in classifiers.items()}
half = len(images) // 2
ensemble = greedy_ensemble({n: p[:half] for n, p in probabilities.items()}, labels[:half])
mixed = ensemble.predict({n: p[half:] for n, p in probabilities.items()})
print(
    "members:",
    ensemble.weights(),
    "validation cross-entropy:",
    [round(c, 4) for c in ensemble.cross_entropies],
)
print("held-out top-1 of the ensemble:", float(np.mean(mixed.argmax(1) == labels[half:])))

"""
## From the command line

`keras-vmoe evaluate` runs all of this on presets and a data set, with
progress bars, a table on stdout, a JSON record and plots:

```shell
keras-vmoe evaluate --preset vit_tiny_cifar10 --preset vmoe_tiny_cifar10 \\
    --cifar10 ../shared/data/cifar10_jpeg.npz --attack pgd --epsilon 1/255,2/255,4/255 --ensemble
keras-vmoe evaluate --preset vmoe_tiny_cifar10 --fashion-mnist --fewshot 1,5,10,25 --rank-presets
```

`benchmarks/robustness.py` runs the robustness study in miniature on the three
presets, and its results are in `benchmarks/results/`.
"""
