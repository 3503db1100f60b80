"""kNN proxy and greedy ensembles (`keras_vmoe.evaluation.model_selection`) against brute force.

Pure NumPy, a few seconds on each backend.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keras_vmoe.evaluation import greedy_ensemble
from keras_vmoe.evaluation import knn_accuracy
from keras_vmoe.evaluation import rank_by_knn
from keras_vmoe.evaluation.model_selection import mean_cross_entropy


def brute_force_knn(train_x, train_y, test_x, test_y, k, metric, leave_one_out=False):
    if metric == "cosine":
        train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
        test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    correct = 0
    for i, (query, label) in enumerate(zip(test_x, test_y)):
        neighbours = sorted(
            (float(np.sum((query - key) ** 2)), j)
            for j, key in enumerate(train_x)
            if not (leave_one_out and j == i)
        )[:k]
        votes = {}
        for _, j in neighbours:
            votes[train_y[j]] = votes.get(train_y[j], 0) + 1
        best = max(votes.values())
        prediction = next(
            train_y[j] for _, j in neighbours if votes[train_y[j]] == best
        )  # nearest tied class
        correct += prediction == label
    return correct / len(test_y)


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_accuracy_matches_a_brute_force_vote(k, metric):
    rng = np.random.RandomState(k)
    train_x, train_y = rng.normal(size=(40, 5)), rng.randint(0, 3, 40)
    test_x, test_y = rng.normal(size=(25, 5)), rng.randint(0, 3, 25)
    expected = brute_force_knn(train_x, train_y, test_x, test_y, k, metric)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k, metric) == pytest.approx(expected)
    expected = brute_force_knn(train_x, train_y, train_x, train_y, k, metric, leave_one_out=True)
    assert knn_accuracy(train_x, train_y, k=k, metric=metric) == pytest.approx(expected)


def test_a_tie_goes_to_the_class_of_the_nearer_neighbour():
    train_x = np.array([[0.0], [1.0], [-3.0], [4.0]])
    train_y = np.array([0, 1, 0, 1])
    # Query at 0.6: neighbours 1.0 (class 1), 0.0 (class 0): a 1-1 tie; 1.0 is nearer.
    assert knn_accuracy(train_x, train_y, np.array([[0.6]]), np.array([1]), k=2) == 1.0
    assert knn_accuracy(train_x, train_y, np.array([[0.4]]), np.array([0]), k=2) == 1.0


def test_rank_by_knn_puts_the_separating_features_first():
    rng = np.random.RandomState(0)
    train_y, test_y = np.arange(60) % 3, np.arange(30) % 3
    centres = np.eye(3) * 5
    good = (centres[train_y] + rng.normal(size=(60, 3)), centres[test_y] + rng.normal(size=(30, 3)))
    noise = (rng.normal(size=(60, 3)), rng.normal(size=(30, 3)))
    ranking = rank_by_knn({"noise": noise, "good": good}, train_y, test_y, k=3)
    assert [name for name, _ in ranking] == ["good", "noise"]
    assert ranking[0][1] == knn_accuracy(*good[:1], train_y, good[1], test_y, k=3)


def brute_force_greedy(probabilities, labels, max_size):
    members, trace = [], []
    while len(members) < max_size:
        scores = {
            name: mean_cross_entropy(np.mean([probabilities[m] for m in members + [name]], axis=0), labels)
            for name in sorted(probabilities)
        }
        best = min(scores, key=lambda n: (scores[n], n))
        if trace and scores[best] >= trace[-1]:
            break
        members.append(best)
        trace.append(scores[best])
    return members, trace


def random_probabilities(rng, models, examples, classes):
    logits = rng.normal(size=(models, examples, classes)) * 2
    e = np.exp(logits)
    return {f"m{i}": e[i] / e[i].sum(-1, keepdims=True) for i in range(models)}


@given(seed=st.integers(0, 2**16), models=st.integers(1, 5), max_size=st.integers(1, 8))
def test_greedy_ensemble_matches_brute_force_and_never_gets_worse(seed, models, max_size):
    rng = np.random.RandomState(seed)
    probabilities = random_probabilities(rng, models, 30, 4)
    labels = rng.randint(0, 4, 30)
    chosen = greedy_ensemble(probabilities, labels, max_size=max_size)
    members, trace = brute_force_greedy(probabilities, labels, max_size)
    assert chosen.members == members
    np.testing.assert_allclose(chosen.cross_entropies, trace, rtol=1e-12)
    assert all(b < a for a, b in itertools.pairwise(chosen.cross_entropies))
    mixed = chosen.predict(probabilities)
    assert mean_cross_entropy(mixed, labels) == pytest.approx(chosen.cross_entropies[-1])
    assert sum(chosen.weights().values()) == pytest.approx(1.0)


def test_without_replacement_each_model_joins_at_most_once():
    rng = np.random.RandomState(3)
    probabilities = random_probabilities(rng, 4, 50, 3)
    labels = rng.randint(0, 3, 50)
    chosen = greedy_ensemble(probabilities, labels, max_size=10, with_replacement=False)
    assert len(set(chosen.members)) == len(chosen.members) <= 4


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: knn_accuracy(np.ones((3, 2)), [0, 1, 0], k=3), "k must be an integer in [1, 2]"),
        (lambda: knn_accuracy(np.ones((3, 2)), [0, 1, 0], metric="l1"), "metric must be one of"),
        (lambda: knn_accuracy(np.ones((3, 2)), [0, 1, 0], np.ones((2, 2))), "give both test_features"),
        (lambda: knn_accuracy(np.ones((3, 2)), [0, 1, 0], np.ones((2, 5)), [0, 1]), "differ in width"),
        (lambda: rank_by_knn({}, [0]), "no candidate models"),
        (lambda: greedy_ensemble({}, [0]), "no candidate models"),
        (lambda: greedy_ensemble({"a": np.ones((2, 3)) / 3}, [0, 3]), "labels must lie in [0, 3)"),
        (lambda: greedy_ensemble({"a": np.ones((2, 3)) / 3}, [0, 1, 2]), "must be (3, classes)"),
        (lambda: greedy_ensemble({"a": np.ones((2, 3)) / 3}, [0, 1], max_size=0), "max_size must be"),
    ],
)
def test_bad_input_is_named(call, needle):
    with pytest.raises(ValueError) as error:
        call()
    assert needle in str(error.value)
