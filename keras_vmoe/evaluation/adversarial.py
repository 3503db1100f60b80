"""PGD attacks and how stable the experts' choice is under them.

"On the Adversarial Robustness of Mixture of Experts" (Puigcerver, Jenatton,
Riquelme, Awasthi, Bhojanapalli) attacks dense and MoE models at equal
compute with PGD and measures, per MoE layer, the intersection over union
of each token's selected experts before and after the attack. This follows
google-research/vmoe (`vmoe/projects/adversarial_attacks/attacks.py`):

- `pgd_attack`: `num_updates` steps `x <- x + (epsilon / num_updates) *
  sign(d loss / d x)`, the loss being the softmax cross-entropy averaged over
  the batch (vmoe's `stateless_attack_pgd`; it does not attack the auxiliary
  losses, vmoe's default). The steps alone keep every image inside the
  L-infinity ball of radius `epsilon`; we clip to the ball as well (against
  rounding). Two differences from vmoe, both switchable:
  `input_range` clips each step to the model's valid inputs (the converter's
  image of pixels [0, 255]; vmoe does not clip), and `keep_best=True` returns,
  per image, the iterate with the highest loss (x_0 included) where vmoe
  returns the last one, so the attack never lowers an image's loss.
- `expert_iou`: vmoe's `sum_intersection_over_union`: per token, |A & B| /
  |A | B| of the expert sets (0 when both are empty), averaged over tokens.
  For Soft MoE, where every token mixes every expert, the sets are the one
  expert whose slots take the largest share of the token's output
  (`keras_vmoe.models.selected_experts`), so the IoU is the fraction of
  tokens whose main expert is unchanged.

Images are independent under attack when each routing group is one image
(`group_size=None`, the default of the zoo's V-MoE); a group spanning
several images lets them compete for capacity, as in vmoe.

Example:
```python
classifier = keras_vmoe.models.VMoEImageClassifier.from_preset("vmoe_tiny_cifar10")
result = evaluate_robustness(classifier, images, labels, epsilon=2 / 255, num_updates=10)
result.adversarial_accuracy, result.expert_iou  # {3: 0.93, 5: 0.88}: per MoE block
```
"""

import dataclasses
import math
import weakref

import keras
import numpy as np

from keras_vmoe.evaluation.inputs import batches
from keras_vmoe.evaluation.inputs import check_classifier
from keras_vmoe.evaluation.inputs import input_range as model_input_range
from keras_vmoe.evaluation.inputs import model_inputs
from keras_vmoe.models.routing_inspection import selected_experts
from keras_vmoe.ops.tools.input_gradients import loss_and_input_gradient


def cross_entropy(labels, logits):
    """Per-example softmax cross-entropy (float32) of integer labels."""
    logits = keras.ops.cast(logits, "float32")
    return keras.ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def check_attack(epsilon, num_updates):
    number = isinstance(epsilon, (int, float, np.floating, np.integer)) and not isinstance(epsilon, bool)
    if not number or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0 (the L-infinity radius), got {epsilon!r}.")
    if isinstance(num_updates, bool) or not isinstance(num_updates, (int, np.integer)) or num_updates < 1:
        raise ValueError(f"num_updates must be an integer >= 1 (PGD steps), got {num_updates!r}.")


def _check_labels(labels, count, num_classes):
    labels = np.asarray(labels)
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be {count} integer class indices, one per image; got {labels.dtype} {labels.shape}."
        )
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (the classifier's classes); "
            f"got {labels.min()}..{labels.max()}."
        )
    return labels.astype("int32")


_STEPS = weakref.WeakKeyDictionary()


def attack_step(model):
    """The model's `loss_and_input_gradient` for the cross-entropy, built once
    per model (JAX and TensorFlow compile it once per input shape)."""
    if model not in _STEPS:
        _STEPS[model] = loss_and_input_gradient(model, cross_entropy)
    return _STEPS[model]


def _per_example_losses(model, x, y):
    return keras.ops.convert_to_numpy(cross_entropy(y, model(x, training=False)))


def pgd_attack(model, inputs, labels, epsilon, num_updates, input_range=None, keep_best=True, step=None):
    """Adversarial versions of one batch of model `inputs` (float32 numpy).

    Args:
        model: a classifier called on model inputs (outputs logits).
        inputs: (B, ...) float model inputs (preprocessed pixels).
        labels: (B,) int true classes.
        epsilon: the L-infinity radius, in the input space's units (vmoe's
            [-1, 1]: 1 / 127.5 is one pixel level).
        num_updates: PGD steps, each of size epsilon / num_updates.
        input_range: None, or (low, high) broadcastable to `inputs`: every
            step is clipped to it.
        keep_best: return each image's highest-loss iterate (x_0 included)
            instead of the last one (vmoe's choice).
        step: None (the model's cached `attack_step`), or another
            `loss_and_input_gradient(model, loss)` function.

    Returns:
        float32 (B, ...) adversarial inputs, each within `epsilon` of its
        input (and within `input_range`).
    """
    check_attack(epsilon, num_updates)
    step = step or attack_step(model)
    x0 = np.asarray(inputs, "float32")
    labels = np.asarray(labels, "int32")
    low, high = x0 - np.float32(epsilon), x0 + np.float32(epsilon)
    if input_range is not None:
        low = np.maximum(low, input_range[0])
        high = np.minimum(high, input_range[1])
        x0 = np.clip(x0, input_range[0], input_range[1])
    delta = np.float32(epsilon / num_updates)
    x = x0
    best, best_loss = x0, None
    for _ in range(num_updates):
        losses, gradient = step(x, labels)
        losses = keras.ops.convert_to_numpy(losses)
        if keep_best:
            if best_loss is None:
                best_loss = losses
            better = losses > best_loss
            best = np.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x, best)
            best_loss = np.maximum(losses, best_loss)
        x = np.clip(x + delta * np.sign(keras.ops.convert_to_numpy(gradient)), low, high).astype("float32")
    if not keep_best:
        return x
    better = _per_example_losses(model, x, labels) > best_loss
    return np.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x, best).astype("float32")


def expert_iou(before, after):
    """(images,) mean over tokens of the IoU of the selected experts.

    `before`, `after`: bool (images, tokens, experts) (`selected_experts`);
    a token whose sets are both empty counts 0, as in vmoe.
    """
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    if before.shape != after.shape or before.ndim != 3:
        raise ValueError(
            f"expert_iou takes two (images, tokens, experts) arrays; got {before.shape} and {after.shape}."
        )
    intersection = (before & after).sum(-1)
    union = (before | after).sum(-1)
    iou = np.where(union > 0, intersection / np.maximum(union, 1), 0.0)
    return iou.mean(-1)


@dataclasses.dataclass
class RobustnessResult:
    """What `evaluate_robustness` measured (means over the images).

    `expert_iou` maps each MoE block index to the mean IoU of its tokens'
    selected experts before and after the attack; `routing_changes` is
    1 - IoU, vmoe's name. Empty for a dense model.
    """

    epsilon: float
    num_updates: int
    num_images: int
    clean_accuracy: float
    adversarial_accuracy: float
    clean_loss: float
    adversarial_loss: float
    prediction_changes: float
    expert_iou: dict

    @property
    def routing_changes(self):
        return {block: 1.0 - iou for block, iou in self.expert_iou.items()}

    def as_dict(self):
        record = dataclasses.asdict(self)
        record["expert_iou"] = {str(block): iou for block, iou in self.expert_iou.items()}
        return record


def evaluate_robustness(
    model, images, labels, epsilon, num_updates=10, batch_size=64, keep_best=True, clip=True, verbose=False
):
    """Attacks a classifier with PGD and measures what changed.

    Args:
        model: an image classifier of the zoo (dense ViT, V-MoE, Soft MoE).
        images: raw images (uint8 pixels) its preprocessor takes, or model
            inputs when the classifier has no preprocessor.
        labels: (N,) int classes.
        epsilon, num_updates, keep_best: as `pgd_attack`.
        batch_size: images attacked together.
        clip: keep adversarial inputs within the valid input range (the
            image converter's image of [0, 255]).
        verbose: a progress bar over batches.

    Returns:
        A `RobustnessResult`.
    """
    check_classifier(model, "evaluate_robustness")
    check_attack(epsilon, num_updates)
    inputs = model_inputs(model, images)
    labels = _check_labels(labels, len(inputs), model.num_classes)
    if not len(inputs):
        raise ValueError("evaluate_robustness got no images.")
    valid_range = model_input_range(model) if clip else None
    step = attack_step(model)
    totals = dict(correct=np.zeros(2), loss=np.zeros(2), changes=0.0)
    iou_sums = {}
    parts = batches(len(inputs), batch_size)
    bar = keras.utils.Progbar(len(parts), unit_name="batch") if verbose else None
    for part in parts:
        x0, y = inputs[part], labels[part]
        x1 = pgd_attack(model, x0, y, epsilon, num_updates, valid_range, keep_best, step)
        predictions = []
        for i, x in enumerate((x0, x1)):
            logits = keras.ops.convert_to_numpy(model(x, training=False))
            totals["loss"][i] += keras.ops.convert_to_numpy(cross_entropy(y, logits)).sum()
            predictions.append(logits.argmax(-1))
            totals["correct"][i] += (predictions[-1] == y).sum()
        totals["changes"] += (predictions[0] != predictions[1]).sum()
        before, after = selected_experts(model.backbone, x0), selected_experts(model.backbone, x1)
        for block in before:
            iou_sums[block] = iou_sums.get(block, 0.0) + expert_iou(before[block], after[block]).sum()
        if bar:
            bar.add(1)
    count = len(inputs)
    return RobustnessResult(
        epsilon=float(epsilon),
        num_updates=int(num_updates),
        num_images=count,
        clean_accuracy=float(totals["correct"][0] / count),
        adversarial_accuracy=float(totals["correct"][1] / count),
        clean_loss=float(totals["loss"][0] / count),
        adversarial_loss=float(totals["loss"][1] / count),
        prediction_changes=float(totals["changes"] / count),
        expert_iou={block: float(total / count) for block, total in sorted(iou_sums.items())},
    )
