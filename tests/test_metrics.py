import math

import numpy as np
import pytest

from dskd.data import get_task
from dskd.data.metrics import accuracy, compute_metrics, f1, matthews_corrcoef, pearson, spearman

# Binary confusion matrix used below: tp=6, tn=3, fp=1, fn=2 (12 examples).
LABELS = np.array([1] * 6 + [0] * 3 + [0] * 1 + [1] * 2)
PREDS = np.array([1] * 6 + [0] * 3 + [1] * 1 + [0] * 2)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    # 6 + 3 correct of 12
    assert accuracy(PREDS, LABELS) == 0.75


def test_f1_known_confusion_matrix():
    # precision 6/7, recall 6/8 -> F1 = 2*6 / (2*6 + 1 + 2) = 12/15
    assert f1(PREDS, LABELS) == pytest.approx(0.8)


def test_f1_without_positives_is_zero():
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1([0, 0, 0], [1, 0, 1]) == 0.0


def test_matthews_corrcoef_known_confusion_matrix():
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (18 - 2) / sqrt(7*8*4*5)
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx(16 / math.sqrt(1120))


def test_matthews_corrcoef_multiclass():
    # correct c=4 of s=6, per-class true and predicted counts all 2:
    # (c*s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt(24 * 24)
    assert matthews_corrcoef([0, 2, 1, 0, 1, 2], [0, 1, 2, 0, 1, 2]) == pytest.approx(0.5)


def test_matthews_corrcoef_constant_predictions_is_zero():
    assert matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0


def test_pearson():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -3 * x) == pytest.approx(-1.0)
    assert pearson(x, np.full(4, 2.5)) == 0.0


def test_spearman_with_ties():
    # ranks of x: [1, 2.5, 2.5, 4]; ranks of y: [1, 3, 2, 4]
    # centred: [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5] -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    # a monotone but non-linear relation is a perfect rank correlation
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same length"):
        accuracy([1, 0], [1, 0, 1])


def test_compute_metrics_classification():
    logits = np.zeros((12, 2))
    logits[np.arange(12), PREDS] = 1.0
    scores = compute_metrics(get_task("mrpc"), logits, LABELS)
    assert scores == {"f1": pytest.approx(0.8), "accuracy": 0.75}
    assert all(type(value) is float for value in scores.values())


def test_compute_metrics_regression():
    labels = np.array([0.0, 1.0, 2.5, 4.0, 5.0])
    logits = (labels * 0.5 + 1).reshape(-1, 1)
    scores = compute_metrics(get_task("stsb"), logits, labels)
    assert scores == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    assert all(type(value) is float for value in scores.values())
