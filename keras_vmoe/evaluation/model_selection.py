"""Choosing pre-trained models for a target task: a kNN proxy and greedy ensembles.

"Scalable Transfer Learning with Expert Models" (Puigcerver, Riquelme,
Mustafa, et al.) ranks candidate models for a new task by a cheap proxy,
the accuracy of a k-nearest-neighbour classifier on their frozen features of
the target data, instead of fine-tuning each one. "Deep Ensembles for
Low-Data Transfer Learning" (Mustafa, Riquelme, Puigcerver, et al.) then
builds an ensemble greedily on validation cross-entropy.

- `knn_accuracy`: each query takes the majority class among its k nearest
  training features (Euclidean, or cosine: Euclidean on unit vectors); a tie
  between classes goes to the one whose nearest member is nearest. Without
  query features it is the leave-one-out accuracy on the training set.
- `rank_by_knn`: candidates sorted by that accuracy, best first.
- `greedy_ensemble`: Caruana-style forward selection: start from the model
  with the lowest validation cross-entropy, then repeatedly add the model
  (with replacement by default, so a member can weigh double) whose
  addition gives the lowest cross-entropy of the averaged probabilities;
  stop when no addition lowers it, or at `max_size`. So the ensemble's
  validation cross-entropy never rises as members are added.

Example:
```python
knn_accuracy(train_features, train_labels, val_features, val_labels, k=5)
greedy_ensemble({"vit": p_vit, "vmoe": p_vmoe}, val_labels).members  # ["vmoe", "vit", ...]
```
"""

import dataclasses

import numpy as np

METRICS = ("euclidean", "cosine")


def _as_features(features, labels, name):
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    if features.ndim != 2 or labels.shape != features.shape[:1] or labels.dtype.kind not in "iu":
        raise ValueError(
            f"knn_accuracy: {name} features must be (N, D) with N integer labels; "
            f"got {features.shape} and {labels.dtype} {labels.shape}."
        )
    return features, labels


def _squared_distances(queries, keys):
    distances = (queries**2).sum(1)[:, None] - 2.0 * queries @ keys.T + (keys**2).sum(1)[None, :]
    return np.maximum(distances, 0.0)


def knn_accuracy(train_features, train_labels, test_features=None, test_labels=None, k=1, metric="euclidean"):
    """Accuracy of a k-nearest-neighbour classifier on frozen features.

    Args:
        train_features, train_labels: the neighbours, (N, D) and (N,) int.
        test_features, test_labels: the queries; None for leave-one-out on
            the training set (each example classified by the others).
        k: neighbours per vote (ties between classes: the class with the
            nearer nearest member wins).
        metric: "euclidean" or "cosine".
    """
    if metric not in METRICS:
        raise ValueError(f"knn_accuracy: metric must be one of {METRICS}, got {metric!r}.")
    keys, key_labels = _as_features(train_features, train_labels, "train")
    leave_one_out = test_features is None
    if leave_one_out != (test_labels is None):
        raise ValueError("knn_accuracy: give both test_features and test_labels, or neither (leave-one-out).")
    queries, query_labels = (
        (keys, key_labels) if leave_one_out else _as_features(test_features, test_labels, "test")
    )
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"knn_accuracy: train and test features differ in width: {keys.shape[1]} and {queries.shape[1]}."
        )
    available = len(keys) - int(leave_one_out)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(
            f"knn_accuracy: k must be an integer in [1, {available}] (the neighbours available), got {k!r}."
        )
    if not len(queries):
        raise ValueError("knn_accuracy: no query examples.")
    if metric == "cosine":
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    num_classes = int(max(key_labels.max(), query_labels.max())) + 1
    correct = 0
    for start in range(0, len(queries), 1024):  # Bounded memory: 1024 x N distances at a time.
        distances = _squared_distances(queries[start : start + 1024], keys)
        if leave_one_out:
            rows = np.arange(len(distances))
            distances[rows, start + rows] = np.inf
        nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]  # nearest first
        votes = np.zeros((len(nearest), num_classes))
        np.add.at(votes, (np.arange(len(nearest))[:, None], key_labels[nearest]), 1.0)
        # Among the classes with the most votes, the one met first in the
        # nearest-first order.
        tied = votes == votes.max(axis=1, keepdims=True)
        first = np.argmax(tied[np.arange(len(nearest))[:, None], key_labels[nearest]], axis=1)
        predictions = key_labels[nearest[np.arange(len(nearest)), first]]
        correct += int((predictions == query_labels[start : start + 1024]).sum())
    return correct / len(queries)


def rank_by_knn(features_by_model, train_labels, test_labels=None, k=1, metric="euclidean"):
    """[(name, kNN accuracy)], best first, for each candidate model.

    `features_by_model`: {name: (train_features, test_features or None)},
    the features each model gives for the same target examples.
    """
    if not features_by_model:
        raise ValueError("rank_by_knn: no candidate models.")
    scores = {
        name: knn_accuracy(train, train_labels, test, test_labels if test is not None else None, k, metric)
        for name, (train, test) in features_by_model.items()
    }
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def mean_cross_entropy(probabilities, labels):
    """Mean over examples of -log p(label), p clipped at 1e-12."""
    probabilities = np.asarray(probabilities, np.float64)
    return float(-np.mean(np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12))))


@dataclasses.dataclass
class GreedyEnsemble:
    """`members` in the order they were added (repeats weigh more); the
    ensemble predicts the mean of its members' probabilities.
    `cross_entropies[i]` is the validation cross-entropy of the first i + 1
    members (non-increasing)."""

    members: list
    cross_entropies: list

    def weights(self):
        """{name: share of the ensemble}."""
        return {name: self.members.count(name) / len(self.members) for name in dict.fromkeys(self.members)}

    def predict(self, probabilities_by_model):
        """The ensemble's probabilities from each member's (N, C)."""
        return sum(w * np.asarray(probabilities_by_model[n], np.float64) for n, w in self.weights().items())


def greedy_ensemble(probabilities_by_model, labels, max_size=None, with_replacement=True):
    """Forward greedy selection of an ensemble on validation cross-entropy.

    Args:
        probabilities_by_model: {name: (N, C) class probabilities on the
            validation set}.
        labels: (N,) int validation labels.
        max_size: the most members (with replacement, counting repeats);
            default: the number of models.
        with_replacement: allow a model to be added again.
    """
    if not probabilities_by_model:
        raise ValueError("greedy_ensemble: no candidate models.")
    labels = np.asarray(labels)
    probabilities = {name: np.asarray(p, np.float64) for name, p in probabilities_by_model.items()}
    for name, p in probabilities.items():
        if p.ndim != 2 or p.shape[0] != len(labels):
            raise ValueError(
                f"greedy_ensemble: {name}'s probabilities must be ({len(labels)}, classes); got {p.shape}."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= p.shape[1]):
            raise ValueError(
                f"greedy_ensemble: labels must lie in [0, {p.shape[1]}) ({name} has {p.shape[1]} classes)."
            )
    max_size = len(probabilities) if max_size is None else max_size
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"greedy_ensemble: max_size must be an integer >= 1, got {max_size!r}.")
    members, cross_entropies, total = [], [], 0.0
    while len(members) < max_size:
        candidates = [n for n in sorted(probabilities) if with_replacement or n not in members]
        if not candidates:
            break
        scores = {
            n: mean_cross_entropy((total + probabilities[n]) / (len(members) + 1), labels) for n in candidates
        }
        best = min(candidates, key=lambda n: (scores[n], n))
        if cross_entropies and scores[best] >= cross_entropies[-1]:
            break
        members.append(best)
        cross_entropies.append(scores[best])
        total = total + probabilities[best]
    return GreedyEnsemble(members, cross_entropies)
