"""Few-shot linear evaluation (`keras_vmoe.evaluation.fewshot`) against NumPy references.

Pure NumPy, a few seconds on each backend.
"""

import numpy as np
import pytest

from keras_vmoe.evaluation import VMOE_L2_REGS
from keras_vmoe.evaluation import fewshot_accuracy
from keras_vmoe.evaluation.fewshot import ridge_cache
from keras_vmoe.evaluation.fewshot import ridge_predict
from keras_vmoe.evaluation.fewshot import ridge_weights


def direct_ridge(x, y, num_classes, l2):
    """(X^T X + l2 I)^-1 X^T Y on whitened features with the bias column, by a solve."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    design = np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    w = np.linalg.solve(design.T @ design + l2 * np.eye(design.shape[1]), design.T @ targets)
    return w, mean, std


@pytest.mark.parametrize("points, dim", [(60, 8), (12, 30)])  # N >= D and N < D
@pytest.mark.parametrize("l2", [2.0**-4, 1.0, 2.0**8])
def test_closed_form_weights_match_a_direct_solve(points, dim, l2):
    rng = np.random.RandomState(points + dim)
    x, y = rng.normal(size=(points, dim)) * rng.uniform(0.1, 3, dim), rng.randint(0, 4, points)
    cache = ridge_cache(x, y, 4)
    expected, mean, std = direct_ridge(x, y, 4, l2)
    np.testing.assert_allclose(ridge_weights(cache, l2), expected, rtol=1e-6, atol=1e-8)
    queries = rng.normal(size=(20, dim))
    design = np.concatenate([(queries - mean) / std, np.full((20, 1), 100.0)], axis=1)
    np.testing.assert_array_equal(ridge_predict(cache, l2, queries), np.argmax(design @ expected, axis=1))


def brute_force_fewshot(train_x, train_y, test_x, test_y, shots, draws, l2_regs, seed):
    num_classes = train_y.max() + 1
    table = {}
    for draw in range(draws):
        rng = np.random.default_rng([seed, draw])
        order = [rng.permutation(np.flatnonzero(train_y == c)) for c in range(num_classes)]
        for k in shots:
            chosen = np.concatenate([o[:k] for o in order])
            for l2 in l2_regs:
                w, mean, std = direct_ridge(train_x[chosen], train_y[chosen], num_classes, l2)
                design = np.concatenate([(test_x - mean) / std, np.full((len(test_x), 1), 100.0)], axis=1)
                table[draw, k, l2] = np.mean(np.argmax(design @ w, axis=1) == test_y)
    return table


def test_accuracies_and_the_chosen_regulariser_match_a_brute_force_run():
    rng = np.random.RandomState(0)
    centres = rng.normal(size=(3, 10)) * 2
    train_y, test_y = np.repeat(np.arange(3), 12), np.repeat(np.arange(3), 20)
    train_x = centres[train_y] + rng.normal(size=(36, 10))
    test_x = centres[test_y] + rng.normal(size=(60, 10))
    l2_regs = (2.0**-3, 1.0, 2.0**5)
    result = fewshot_accuracy(train_x, train_y, test_x, test_y, shots=(1, 5, 10), draws=3, l2_regs=l2_regs)
    table = brute_force_fewshot(train_x, train_y, test_x, test_y, (1, 5, 10), 3, l2_regs, 0)
    for k in (1, 5, 10):
        chosen = result[k]["l2_reg"]
        assert chosen in l2_regs
        per_draw = [table[d, k, chosen] for d in range(3)]
        assert result[k]["per_draw"] == pytest.approx(per_draw, abs=1e-12)
        assert result[k]["accuracy"] == pytest.approx(np.mean(per_draw))
        assert result[k]["std"] == pytest.approx(np.std(per_draw))
        # No other l2 has a strictly better mean rank (ties: vmoe takes the first).
        ranks = [np.argsort(np.argsort([table[d, k, m] for m in l2_regs])) for d in range(3)]
        assert np.mean(ranks, axis=0)[l2_regs.index(chosen)] == np.max(np.mean(ranks, axis=0))
    assert result[10]["accuracy"] > result[1]["accuracy"]  # Separable clusters: more shots help.


def test_vmoes_regularisers():
    assert VMOE_L2_REGS[0] == 2.0**-10 and VMOE_L2_REGS[-1] == 2.0**19 and len(VMOE_L2_REGS) == 30


def test_draws_are_reproducible_and_seeded():
    rng = np.random.RandomState(1)
    x, y = rng.normal(size=(50, 6)), np.arange(50) % 5
    a = fewshot_accuracy(x, y, x, y, shots=(2,), draws=2, seed=3)
    b = fewshot_accuracy(x, y, x, y, shots=(2,), draws=2, seed=3)
    assert a == b


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(shots=(11,)), "11 shots need 11 training examples per class, but class 0 has 10"),
        (dict(shots=(0,)), "shots must be integers >= 1"),
        (dict(draws=0), "draws must be an integer >= 1"),
        (dict(l2_regs=(0.0,)), "l2_regs must be positive"),
        (dict(test_x=np.zeros((4, 3))), "differ in width: 6 and 3"),
        (dict(train_y=np.arange(30) % 3 * 1.0), "integer labels"),
        (dict(train_x=np.zeros((0, 6)), train_y=np.zeros(0, int)), "no train examples"),
    ],
)
def test_bad_input_is_named(change, needle):
    arguments = dict(
        train_x=np.ones((30, 6)), train_y=np.arange(30) % 3, test_x=np.ones((4, 6)), test_y=np.arange(4) % 3
    )
    arguments.update(change)
    options = {key: arguments.pop(key) for key in ("shots", "draws", "l2_regs") if key in arguments}
    with pytest.raises(ValueError) as error:
        fewshot_accuracy(
            arguments["train_x"], arguments["train_y"], arguments["test_x"], arguments["test_y"], **options
        )
    assert needle in str(error.value)
