"""PGD attacks and expert IoU (`keras_vmoe.evaluation.adversarial`), on every backend."""

import keras
import numpy as np
import pytest

from keras_vmoe.evaluation import evaluate_robustness
from keras_vmoe.evaluation import expert_iou
from keras_vmoe.evaluation import input_range
from keras_vmoe.evaluation import pgd_attack
from keras_vmoe.evaluation.adversarial import cross_entropy
from keras_vmoe.models import SoftMoEBackbone
from keras_vmoe.models import SoftMoEImageClassifier
from keras_vmoe.models import VMoEBackbone
from keras_vmoe.models import VMoEImageClassifier
from keras_vmoe.models import router_inputs
from keras_vmoe.models import selected_experts
from keras_vmoe.ops.tools.input_gradients import loss_and_input_gradient
from tests.helpers import FLOAT32_EPS
from tests.helpers import random_images
from tests.helpers import tiny_vit_arguments
from tests.helpers import to_numpy

MOE = dict(moe_layers=(1,), num_experts=4)
FAMILIES = {
    "dense": lambda: VMoEImageClassifier(VMoEBackbone(**tiny_vit_arguments()), 5),
    # K = 2 of 4 experts, capacity 0.5: choices are dropped, so some tokens
    # have one expert or none. Each image is its own routing group.
    "vmoe": lambda: VMoEImageClassifier(
        VMoEBackbone(**tiny_vit_arguments(num_selected_experts=2, capacity_factor=0.5, **MOE)), 5
    ),
    "soft_moe": lambda: SoftMoEImageClassifier(
        SoftMoEBackbone(
            **tiny_vit_arguments(slots_per_expert=2, pooling="gap", use_class_token=False, **MOE)
        ),
        5,
    ),
}
EPSILON = 0.05
RANGE = (np.float32(-1.0), np.float32(1.0))


@pytest.fixture(scope="module")
def models():
    built = {}
    for name, make in FAMILIES.items():
        keras.utils.set_random_seed(0)
        built[name] = make()
    return built


@pytest.fixture(scope="module")
def batch():
    images = random_images(6, seed=1)
    labels = np.arange(6, dtype="int32") % 5
    return images, labels


def losses_of(model, x, y):
    return to_numpy(cross_entropy(y, model(x, training=False))).astype(np.float64)


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_linear_pgd(weights, bias, x0, y, epsilon, num_updates, low, high, keep_best):
    """vmoe's PGD on logits = x @ W + b, with the gradient written out, float64."""
    x0 = x0.astype(np.float64)
    one_hot = np.eye(weights.shape[1])[y]
    lo, hi = np.maximum(x0 - epsilon, low), np.minimum(x0 + epsilon, high)
    x, best, best_loss, margin = x0, x0, None, np.inf
    for _ in range(num_updates):
        p = softmax(x @ weights + bias)
        loss = -np.log(p[np.arange(len(y)), y])
        if best_loss is None:
            best_loss = loss
        best = np.where((loss > best_loss)[:, None], x, best)
        best_loss = np.maximum(loss, best_loss)
        gradient = (p - one_hot) @ weights.T / len(y)  # d mean(loss) / dx
        margin = min(margin, np.abs(gradient).min())
        x = np.clip(x + epsilon / num_updates * np.sign(gradient), lo, hi)
    if not keep_best:
        return x, margin
    final = -np.log(softmax(x @ weights + bias)[np.arange(len(y)), y])
    return np.where((final > best_loss)[:, None], x, best), margin


@pytest.mark.parametrize("keep_best", [False, True])
def test_pgd_on_a_linear_model_matches_the_written_out_gradient(keep_best):
    rng = np.random.RandomState(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    weights, bias = rng.normal(size=(6, 3)), rng.normal(size=3)
    model.set_weights([weights.astype("float32"), bias.astype("float32")])
    x0 = rng.uniform(-0.9, 0.9, (8, 6)).astype("float32")
    y = rng.randint(0, 3, 8).astype("int32")
    ours = pgd_attack(model, x0, y, 0.3, 4, RANGE, keep_best=keep_best)
    reference, margin = reference_linear_pgd(weights, bias, x0, y, 0.3, 4, -1.0, 1.0, keep_best)
    # Each coordinate moves by +-epsilon / 4 per step, by the sign of its
    # gradient: no gradient component comes within float32 noise of 0 (nor
    # a loss comparison of a tie), so float32 against float64 differs only
    # by rounding.
    assert margin > 1e-4, margin
    np.testing.assert_allclose(ours, reference, atol=4 * FLOAT32_EPS)
    assert not np.allclose(ours, x0)


def test_input_gradient_is_the_gradient_of_the_mean_loss():
    rng = np.random.RandomState(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    weights, bias = rng.normal(size=(5, 4)), rng.normal(size=4)
    model.set_weights([weights.astype("float32"), bias.astype("float32")])
    x = rng.normal(size=(3, 5)).astype("float32")
    y = np.array([0, 3, 1], "int32")
    losses, gradient = loss_and_input_gradient(model, cross_entropy)(x, y)
    p = softmax(x.astype(np.float64) @ weights + bias)
    np.testing.assert_allclose(to_numpy(losses), -np.log(p[np.arange(3), y]), rtol=1e-5)
    expected = (p - np.eye(4)[y]) @ weights.T / 3
    np.testing.assert_allclose(to_numpy(gradient), expected, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adversarial_images_stay_in_the_ball_and_range_and_raise_every_loss(models, batch, family):
    model = models[family]
    images, labels = batch
    adversarial = pgd_attack(model, images, labels, EPSILON, 4, RANGE)
    # The steps are exact multiples of epsilon / 4; the clip bounds are
    # x0 +- epsilon rounded to float32 once.
    slack = 2 * FLOAT32_EPS
    assert np.abs(adversarial.astype(np.float64) - images).max() <= EPSILON + slack
    assert adversarial.min() >= -1.0 and adversarial.max() <= 1.0
    before, after = losses_of(model, images, labels), losses_of(model, adversarial, labels)
    assert np.all(after >= before), (before, after)
    assert np.mean(after - before) > 0.01  # The attack does something.


def test_the_last_iterate_is_vmoes_and_may_differ_from_the_best(models, batch):
    model = models["vmoe"]
    images, labels = batch
    last = pgd_attack(model, images, labels, EPSILON, 4, None, keep_best=False)
    steps = (last.astype(np.float64) - images) / (EPSILON / 4)
    # Without clipping, every coordinate moved by a whole number of steps (vmoe).
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert np.abs(steps).max() <= 4 + 1e-3


def brute_force_selected(model, images):
    """{block: (images, tokens, experts)} from each plan's dispatch table
    (sparse) or combine weights (soft), with Python loops."""
    chosen = {}
    for index, tokens in router_inputs(model.backbone, images).items():
        moe = model.backbone.get_layer(f"encoder_block_{index}").mlp
        plan, _ = moe.router(tokens, training=False)
        groups, group_size = tokens.shape[0], tokens.shape[1]
        table = np.zeros((groups, group_size, moe.num_experts), bool)
        if hasattr(plan, "dispatch_index"):
            dispatch = to_numpy(plan.dispatch_index)  # (G, E, C): token in each slot
            for g in range(groups):
                for e in range(dispatch.shape[1]):
                    for token in dispatch[g, e]:
                        if token < group_size:
                            table[g, token, e] = True
        else:
            weights = to_numpy(plan.combine_weights).sum(-1)  # (G, S, E)
            for g in range(groups):
                for s in range(group_size):
                    table[g, s, int(np.argmax(weights[g, s]))] = True
        chosen[index] = table.reshape(len(images), -1, moe.num_experts)
    return chosen


def brute_force_iou(a, b):
    ious = []
    for image_a, image_b in zip(a, b):
        per_token = []
        for ta, tb in zip(image_a, image_b):
            sa, sb = set(np.flatnonzero(ta)), set(np.flatnonzero(tb))
            per_token.append(len(sa & sb) / len(sa | sb) if sa | sb else 0.0)
        ious.append(np.mean(per_token))
    return np.array(ious)


@pytest.mark.parametrize("family", ["vmoe", "soft_moe"])
def test_expert_iou_equals_a_brute_force_count_from_the_routing_plans(models, batch, family):
    model = models[family]
    images, labels = batch
    adversarial = pgd_attack(model, images, labels, EPSILON, 4, None)
    before, after = brute_force_selected(model, images), brute_force_selected(model, adversarial)
    for block, table in selected_experts(model.backbone, images).items():
        np.testing.assert_array_equal(table, before[block])
    if family == "vmoe":  # Capacity 0.5 drops choices: some tokens have 0 or 1 expert.
        counts = before[1].sum(-1)
        assert counts.min() < 2 and counts.max() == 2
    result = evaluate_robustness(model, images, labels, EPSILON, 4, clip=False)
    expected = brute_force_iou(before[1], after[1]).mean()
    assert result.expert_iou == pytest.approx({1: expected}, abs=1e-12)
    assert result.routing_changes[1] == pytest.approx(1 - expected)
    assert 0.0 < expected < 1.0


def test_expert_iou_on_random_sets():
    rng = np.random.RandomState(2)
    a, b = rng.rand(3, 7, 5) < 0.3, rng.rand(3, 7, 5) < 0.3
    np.testing.assert_allclose(expert_iou(a, b), brute_force_iou(a, b), atol=1e-12)
    assert np.all(expert_iou(a, a) == np.where(a.any(-1), 1.0, 0.0).mean(-1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_robustness_at_epsilon_zero_changes_nothing(models, batch, family):
    model = models[family]
    images, labels = batch
    result = evaluate_robustness(model, images, labels, 0.0, 2)
    assert result.prediction_changes == 0.0
    assert result.adversarial_accuracy == result.clean_accuracy
    assert result.adversarial_loss == pytest.approx(result.clean_loss, rel=1e-6)
    if family == "dense":
        assert result.expert_iou == {}
    elif family == "soft_moe":
        assert result.expert_iou == {1: 1.0}
    record = result.as_dict()
    assert record["num_images"] == 6 and set(record["expert_iou"]) == ({"1"} if family != "dense" else set())


def test_the_presets_input_range_is_vmoes():
    from keras_vmoe.models import VMoEImageConverter

    converter = VMoEImageConverter(image_size=(32, 32), scale=1 / 127.5, offset=-1.0)
    model = type("WithConverter", (), {"preprocessor": type("P", (), {"image_converter": converter})()})()
    low, high = input_range(model)
    assert float(low) == pytest.approx(-1.0) and float(high) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(epsilon=-0.1), "epsilon must be a finite number >= 0"),
        (dict(epsilon=float("nan")), "epsilon must be a finite number >= 0"),
        (dict(num_updates=0), "num_updates must be an integer >= 1"),
        (dict(num_updates=2.5), "num_updates must be an integer >= 1"),
        (dict(labels=np.array([0, 1, 2, 3, 4, 5])), "labels must lie in [0, 5)"),
        (dict(labels=np.zeros(3, "int32")), "labels must be 6 integer class indices"),
    ],
)
def test_bad_attack_arguments_are_named(models, batch, kwargs, needle):
    images, labels = batch
    arguments = dict(epsilon=0.1, num_updates=2, labels=labels) | kwargs
    with pytest.raises(ValueError) as error:
        evaluate_robustness(models["dense"], images, **arguments)
    assert needle in str(error.value)


def test_a_model_that_is_not_a_classifier_of_the_zoo_is_refused(batch):
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(5)])
    with pytest.raises(ValueError, match="needs an image classifier of the zoo"):
        evaluate_robustness(model, *batch, epsilon=0.1)
