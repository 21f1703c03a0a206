"""Is one method better than another on a dev set? Means over seeds and a paired bootstrap.

The paired bootstrap (Efron & Tibshirani; Koehn 2004 for NLP; Dror et al. 2018 on its use)
resamples the dev examples with replacement, the same examples for both methods (paired), and
recomputes the difference of the metric each time. Runs of several seeds enter as their mean: in
every replicate each method's seeds are also drawn with replacement, so a difference that one
lucky seed makes does not pass for a method's. The two-sided p-value is twice the share of
replicates on the far side of zero (at least 1/replicates), the interval the 2.5th and 97.5th
percentiles of the differences.

Classification metrics are computed from confusion counts, so 10,000 replicates of a
few runs cost a handful of matrix products instead of 10,000 metric calls.
"""

from __future__ import annotations

import numpy as np

# Metrics that follow from a binary confusion matrix, by name (the task's metric names).
_FROM_COUNTS = ("accuracy", "f1", "matthews_corrcoef")


def _metric_from_counts(name: str, tp, fp, fn, tn) -> np.ndarray:
    total = tp + fp + fn + tn
    if name == "accuracy":
        return (tp + tn) / total
    if name == "f1":
        denominator = 2 * tp + fp + fn
        return np.divide(2 * tp, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    numerator = tp * tn - fp * fn
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.divide(numerator, denominator, out=np.zeros_like(denominator), where=denominator > 0)


def _replicate_scores(metric: str, predicted: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[replicates, seeds]: the metric of every seed's predictions under every replicate's
    example weights (``weights[r, i]``: how often replicate r drew example i)."""
    if metric == "accuracy":
        return weights @ (predicted == labels).T.astype(np.float64) / weights.sum(1, keepdims=True)
    positive, gold = (predicted == 1).T.astype(np.float64), (labels == 1).astype(np.float64)[:, None]
    tp, fp = weights @ (positive * gold), weights @ (positive * (1 - gold))
    fn, tn = weights @ ((1 - positive) * gold), weights @ ((1 - positive) * (1 - gold))
    return _metric_from_counts(metric, tp, fp, fn, tn)


def check_metric(metric: str, num_labels: int) -> None:
    if metric not in _FROM_COUNTS or (metric != "accuracy" and num_labels != 2):
        raise ValueError(f"the paired bootstrap supports accuracy, and F1/MCC of two classes; got {metric} "
                         f"with {num_labels} classes")


def paired_bootstrap(metric: str, a: list, b: list, labels, replicates: int = 10_000, seed: int = 0,
                     num_labels: int = 2) -> dict:
    """Compare method A (``a``: its runs' predicted labels, one array per seed) with method B on
    the same dev set (``labels``). Returns the means over seeds, their difference A - B, the 95%
    bootstrap interval of the difference and the two-sided ``p`` value (see the module doc)."""
    result = pooled_paired_bootstrap(metric, [(a, b)], labels, replicates, seed, num_labels)
    result["seeds"] = result["seeds"][0]  # [seeds of a, seeds of b], not one such pair per row
    return result


def pooled_paired_bootstrap(metric: str, pairs: list, labels, replicates: int = 10_000, seed: int = 0,
                            num_labels: int = 2) -> dict:
    """The mean of several paired differences on one dev set, e.g. every method of a grid run two
    ways (``pairs``: ``(a, b)`` per method, each a list of runs' predictions). Each replicate
    draws the examples once for all pairs, so the test keeps the pairing and counts each method's
    own difference; the seeds are drawn per row as in ``paired_bootstrap`` (one pair: the same
    draws, the same answer)."""
    check_metric(metric, num_labels)
    if not pairs:
        raise ValueError("pooled_paired_bootstrap needs at least one (a, b) pair")
    labels = np.asarray(labels).reshape(-1)
    n = labels.size
    pairs = [tuple(np.asarray(runs).reshape(len(runs), -1) for runs in pair) for pair in pairs]
    for a, b in pairs:
        if a.shape[1] != n or b.shape[1] != n:
            raise ValueError(f"every run needs one prediction per dev example ({n}); got {a.shape[1]} and {b.shape[1]}")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)
    full = np.ones((1, n))
    diffs, means_a, means_b = np.zeros(replicates), [], []
    for a, b in pairs:
        scores_a = _replicate_scores(metric, a, labels, weights)
        scores_b = _replicate_scores(metric, b, labels, weights)
        picks_a = rng.integers(0, len(a), size=(replicates, len(a)))
        picks_b = rng.integers(0, len(b), size=(replicates, len(b)))
        diffs += (np.take_along_axis(scores_a, picks_a, 1).mean(1) - np.take_along_axis(scores_b, picks_b, 1).mean(1))
        means_a.append(float(_replicate_scores(metric, a, labels, full).mean()))
        means_b.append(float(_replicate_scores(metric, b, labels, full).mean()))
    diffs /= len(pairs)
    mean_a, mean_b = float(np.mean(means_a)), float(np.mean(means_b))
    far = min(np.mean(diffs <= 0), np.mean(diffs >= 0))
    return {
        "metric": metric,
        "a": mean_a,
        "b": mean_b,
        "diff": mean_a - mean_b,
        "low": float(np.percentile(diffs, 2.5)),
        "high": float(np.percentile(diffs, 97.5)),
        "p": float(min(1.0, max(2 * far, 1.0 / replicates))),
        "seeds": [[len(a), len(b)] for a, b in pairs],
        "replicates": replicates,
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (Holm 1979), in the given order.

    A table that tests ten methods against one reference at 5% expects one false mark by chance;
    an adjusted p below alpha controls the chance of any false mark in the family at alpha, and
    Holm's is uniformly more powerful than Bonferroni's. The smallest p is multiplied by m, the
    next by m - 1, and so on, kept monotone and capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        if not 0.0 <= p_values[i] <= 1.0:
            raise ValueError(f"holm: p-values lie in [0, 1]; got {p_values[i]} at position {i}")
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
