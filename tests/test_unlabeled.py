"""`data.unlabeled`: training rows after `train_limit` without their labels, taught by the teacher only."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_dskd, write_config
from dskd.config import ExperimentConfig
from dskd.data import UNLABELED, get_task, labelled_rows
from dskd.data.loading import with_unlabeled_rows
from dskd.errors import DskdError
from dskd.losses import HardLabelLoss
from dskd.methods import load_experiment


@pytest.mark.parametrize("overrides, message", [
    ({"data.unlabeled": True, "data.train_limit": None}, r"`data.unlabeled` trains on the rows after .*set it"),
    ({"data.unlabeled_limit": 10}, r"`data.unlabeled_limit` caps .* set `data.unlabeled: true`"),
    ({"data.unlabeled": True, "data.unlabeled_limit": 0}, r"`data.unlabeled_limit` must be at least 1"),
    ({"data.unlabeled": True, "data.holdout": 0.1}, r"`data.holdout` works on gold labels"),
    ({"data.unlabeled": True, "losses": {"rw_kd": {"weight": 1.0}}},
     r"`losses.rw_kd` reads the gold label of every training row"),
    ({"data.unlabeled": True, "losses": {"codir": {"weight": 1.0}}}, r"`losses.codir` reads the gold label"),
])
def test_settings_that_cannot_work_without_labels_are_refused_by_key(tmp_path, overrides, message):
    with pytest.raises(DskdError, match=message):
        load_experiment(write_config(tmp_path / "u.yaml", overrides))


def test_terms_that_skip_or_ignore_labels_are_accepted(tmp_path):
    cfg = load_experiment(write_config(tmp_path / "u.yaml", {
        "data.unlabeled": True, "losses": {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5},
                                          "codir": {"weight": 0.1, "negatives": "random", "k": 4}}}))
    assert isinstance(cfg, ExperimentConfig) and cfg.data.unlabeled


def test_rows_after_train_limit_lose_their_labels_and_keep_their_idx(tmp_path):
    cfg = load_experiment(write_config(tmp_path / "u.yaml", {"data.unlabeled": True, "data.train_limit": 100,
                                                            "data.unlabeled_limit": 50}))
    task = get_task("sst2")
    from dskd.data import load_split

    full = load_split(task, cfg.data.path, "train", 150)
    rows = with_unlabeled_rows(task, cfg.data)
    assert len(rows) == 150 and rows["idx"] == full["idx"] and rows["text_a"] == full["text_a"]
    assert rows["label"][:100] == full["label"][:100] and set(rows["label"][100:]) == {UNLABELED}
    assert labelled_rows(rows) == 100
    cfg.data.unlabeled_limit = None  # all the rest
    assert len(with_unlabeled_rows(task, cfg.data)) == len(load_split(task, cfg.data.path, "train"))


def test_hard_ce_averages_over_the_labelled_rows_and_gives_zero_without_any():
    logits = torch.randn(6, 2, requires_grad=True)
    labels = torch.tensor([1, UNLABELED, 0, UNLABELED, UNLABELED, 1])
    loss = HardLabelLoss()({"logits": logits}, {"labels": labels}, None)
    keep = labels != UNLABELED
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], labels[keep]).item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.any(logits.grad[keep] != 0)
    none = HardLabelLoss()({"logits": logits}, {"labels": torch.full((6,), UNLABELED)}, None)
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.slow
def test_a_run_trains_on_unlabeled_rows_through_the_teacher_cache(session_tmp):
    """cache-teacher writes every row (labelled or not) and distill reads them: the soft-label term
    sees all 320 rows, hard_ce the first 256; the run completes and says so."""
    cfg = write_config(session_tmp / "unlabeled.yaml", {"data.unlabeled": True, "data.unlabeled_limit": 64})
    cache, out = session_tmp / "unlabeled-cache", session_tmp / "unlabeled-run"
    proc = run_dskd(["cache-teacher", "--config", cfg, "--output", cache], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_dskd(["distill", "--config", cfg, "--output", out, "--set", f"teacher.cache={cache}"], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "[data] 256 labelled training examples and 64 without labels (data.unlabeled)" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 * (320 // 16)  # 20 steps an epoch: the unlabeled rows are trained on
