"""The paired bootstrap behind docs/results.md's significance marks (dskd/data/significance.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dskd.data import metrics
from dskd.data.significance import _replicate_scores, holm, paired_bootstrap, pooled_paired_bootstrap

METRIC_FNS = {"accuracy": metrics.accuracy, "f1": metrics.f1, "matthews_corrcoef": metrics.matthews_corrcoef}


@pytest.mark.parametrize("metric", list(METRIC_FNS))
def test_metrics_from_weighted_counts_equal_the_metric_of_the_resampled_examples(metric):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 50)
    predicted = np.stack([np.where(rng.random(50) < 0.8, labels, 1 - labels) for _ in range(3)])
    weights = rng.multinomial(50, np.full(50, 1 / 50), size=20).astype(float)
    scores = _replicate_scores(metric, predicted, labels, weights)
    for r in range(20):
        drawn = np.repeat(np.arange(50), weights[r].astype(int))  # the resample written out
        for s in range(3):
            assert scores[r, s] == pytest.approx(METRIC_FNS[metric](predicted[s][drawn], labels[drawn]), abs=1e-12)


def test_identical_methods_differ_by_nothing():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    runs = [np.where(rng.random(200) < 0.85, labels, 1 - labels) for _ in range(3)]
    out = paired_bootstrap("accuracy", runs, runs, labels, replicates=2000)
    assert out["diff"] == 0 and out["a"] == out["b"] == pytest.approx(np.mean([np.mean(r == labels) for r in runs]))
    assert out["p"] > 0.5  # only the seed draws differ between the two sides


def test_a_real_gap_is_significant_and_a_one_example_gap_is_not():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 872)
    weak = np.where(rng.random(872) < 0.80, labels, 1 - labels)
    strong = weak.copy()
    wrong = np.flatnonzero(weak != labels)
    strong[wrong[:60]] = labels[wrong[:60]]  # 60 more right, none more wrong: +6.9 points
    out = paired_bootstrap("accuracy", [strong], [weak], labels, replicates=4000)
    assert out["diff"] == pytest.approx(60 / 872)
    assert out["p"] < 0.001 and out["low"] > 0.04
    nudged = weak.copy()
    nudged[wrong[:1]] = labels[wrong[:1]]
    close = paired_bootstrap("accuracy", [nudged], [weak], labels, replicates=4000)
    assert close["p"] > 0.3 and close["low"] <= 0 <= close["high"]


def test_seed_spread_widens_the_interval():
    """The same mean gap is less certain when a method's seeds disagree: seeds are resampled too."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    base = np.where(rng.random(400) < 0.8, labels, 1 - labels)
    wrong = np.flatnonzero(base != labels)

    def fixed(k):
        run = base.copy()
        run[wrong[:k]] = labels[wrong[:k]]
        return run

    steady = paired_bootstrap("accuracy", [fixed(12)] * 3, [base] * 3, labels, replicates=4000)
    spread = paired_bootstrap("accuracy", [fixed(0), fixed(12), fixed(24)], [base] * 3, labels, replicates=4000)
    assert steady["diff"] == pytest.approx(spread["diff"])
    assert spread["high"] - spread["low"] > 1.5 * (steady["high"] - steady["low"])
    assert spread["p"] > steady["p"]


def test_same_seed_same_answer_and_bad_input_named():
    labels = np.array([0, 1, 1, 0, 1])
    a, b = [np.array([0, 1, 0, 0, 1])], [np.array([1, 1, 0, 0, 1])]
    assert paired_bootstrap("f1", a, b, labels, replicates=500, seed=5) == \
        paired_bootstrap("f1", a, b, labels, replicates=500, seed=5)
    with pytest.raises(ValueError, match="one prediction per dev example"):
        paired_bootstrap("accuracy", [np.zeros(4)], b, labels)
    with pytest.raises(ValueError, match="supports accuracy"):
        paired_bootstrap("pearson", a, b, labels)
    with pytest.raises(ValueError, match="F1/MCC of two classes"):
        paired_bootstrap("f1", a, b, labels, num_labels=3)


def test_pooled_bootstrap_averages_the_pairs_differences_on_shared_examples():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 400)

    def run(right):
        return np.where(rng.random(400) < right, labels, 1 - labels)

    better, worse, base = [run(0.88)], [run(0.66)], [run(0.78)]
    up = paired_bootstrap("accuracy", better, base, labels, replicates=3000)
    down = paired_bootstrap("accuracy", worse, base, labels, replicates=3000)
    assert up["p"] < 0.01 and down["p"] < 0.01 and up["diff"] > 0 > down["diff"]
    # One pair, or the same single-seed pair twice: exactly paired_bootstrap's answer.
    once = pooled_paired_bootstrap("accuracy", [(better, base)], labels, replicates=3000)
    twice = pooled_paired_bootstrap("accuracy", [(better, base), (better, base)], labels, replicates=3000)
    for key in ("a", "b", "diff", "low", "high", "p"):
        assert once[key] == up[key] and twice[key] == pytest.approx(up[key])
    # A gain on one method and a loss on another: the pooled difference is their mean.
    both = pooled_paired_bootstrap("accuracy", [(better, base), (worse, base)], labels, replicates=3000)
    assert both["diff"] == pytest.approx((up["diff"] + down["diff"]) / 2)
    assert both["seeds"] == [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match="at least one"):
        pooled_paired_bootstrap("accuracy", [], labels)


def test_holm_adjustment_by_hand():
    # m = 4; sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06, kept monotone), 0.5 (x1).
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm([0.4, 0.3]) == pytest.approx([0.6, 0.6])  # 0.3 x 2 = 0.6; 0.4 x 1 < 0.6 -> 0.6
    assert holm([0.9, 0.8, 0.7]) == [1.0, 1.0, 1.0]  # capped
    assert holm([0.004]) == [0.004] and holm([]) == []
    with pytest.raises(ValueError, match="position 1"):
        holm([0.1, 1.5])
