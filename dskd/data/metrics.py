"""GLUE metrics in plain numpy.

Degenerate inputs (no positive class, constant predictions) score 0.0 instead of NaN:
early in training a model often predicts one class everywhere, and a NaN would break the
"is this checkpoint better?" comparison that picks the best model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from dskd.data import TaskSpec


def _flat_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a).reshape(-1)
    b = np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"inputs must have the same length, got {a.size} and {b.size}")
    if a.size == 0:
        raise ValueError("metrics need at least one example")
    return a, b


def accuracy(preds, labels) -> float:
    preds, labels = _flat_pair(preds, labels)
    return float(np.mean(preds == labels))


def f1(preds, labels) -> float:
    """Binary F1 of the positive class 1."""
    preds, labels = _flat_pair(preds, labels)
    true_pos = np.sum((preds == 1) & (labels == 1))
    false_pos = np.sum((preds == 1) & (labels != 1))
    false_neg = np.sum((preds != 1) & (labels == 1))
    denominator = 2 * true_pos + false_pos + false_neg
    return float(2 * true_pos / denominator) if denominator else 0.0


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation, in its multiclass form (equal to the usual one for 2 classes)."""
    preds, labels = _flat_pair(preds, labels)
    classes, encoded = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    true_ids, pred_ids = encoded[: labels.size], encoded[labels.size :]
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (true_ids, pred_ids), 1)
    true_counts = confusion.sum(axis=1)
    pred_counts = confusion.sum(axis=0)
    correct = np.trace(confusion)
    total = confusion.sum()
    numerator = correct * total - pred_counts @ true_counts
    denominator = np.sqrt((total**2 - pred_counts @ pred_counts) * (total**2 - true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0


def pearson(x, y) -> float:
    """Pearson correlation; 0.0 when either input is constant."""
    x, y = _flat_pair(x, y)
    x = x.astype(np.float64) - x.mean()
    y = y.astype(np.float64) - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float((x @ y) / denominator) if denominator else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts_group = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group_of_position = np.cumsum(starts_group) - 1
    group_starts = np.flatnonzero(starts_group)
    group_ends = np.append(group_starts[1:], values.size)
    group_mean_rank = (group_starts + group_ends - 1) / 2 + 1
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = group_mean_rank[group_of_position]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation with average ranks for ties."""
    x, y = _flat_pair(x, y)
    return pearson(_average_ranks(x), _average_ranks(y))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(task: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score model outputs with the task's metrics, keyed by metric name.

    Classification logits have shape (n, num_labels) and are reduced by argmax;
    regression outputs (num_labels == 1) are used as the predicted scores.
    """
    logits = np.asarray(logits)
    preds = logits.reshape(-1) if task.num_labels == 1 else np.argmax(logits, axis=-1)
    labels = np.asarray(labels).reshape(-1)
    return {name: METRICS[name](preds, labels) for name in task.metrics}
