"""KD under noisy labels: the reproducible label-noise injector, the held-out split, and the
two mitigations (teacher trust that grows with the estimated noise; small-loss selection)
by hand, plus real runs that log the noise and resume exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_run, run_dskd, write_config
from dskd.config import LabelNoiseConfig
from dskd.methods import load_experiment
from dskd.data import apply_label_noise, get_task, label_noise, split_holdout
from dskd.errors import DskdError
from dskd.losses import build_loss_terms


def test_symmetric_noise_changes_exactly_the_rate_to_other_classes_reproducibly():
    labels = np.arange(3000) % 3
    noisy = label_noise(labels, 3, 0.2, "symmetric", seed=5)
    changed = noisy != labels
    assert changed.sum() == 600
    assert np.array_equal(noisy, label_noise(labels, 3, 0.2, "symmetric", seed=5))
    assert not np.array_equal(noisy, label_noise(labels, 3, 0.2, "symmetric", seed=6))
    # The new class is one of the two others, about evenly.
    shifts = (noisy[changed] - labels[changed]) % 3
    assert set(shifts.tolist()) == {1, 2} and abs((shifts == 1).mean() - 0.5) < 0.08
    assert np.array_equal(label_noise(labels, 3, 0.0, "symmetric", seed=5), labels)


def test_asymmetric_noise_flips_each_source_class_to_its_target():
    labels = np.array([0] * 100 + [1] * 50 + [2] * 10)
    noisy = label_noise(labels, 3, 0.4, "asymmetric", seed=1)  # default: 0 -> 1, 1 -> 2; the last class stays
    assert ((labels == 0) & (noisy == 1)).sum() == 40 and ((labels == 1) & (noisy == 2)).sum() == 20
    assert (noisy[labels == 2] == 2).all() and ((noisy != labels) == ((labels == 0) & (noisy == 1)) |
                                                 ((labels == 1) & (noisy == 2))).all()
    custom = label_noise(labels, 3, 0.5, "asymmetric", seed=1, flip={2: 0})
    assert (custom[labels == 2] == 0).sum() == 5 and (custom[labels != 2] == labels[labels != 2]).all()


def _dataset(labels):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [[1, 2]] * len(labels), "label": labels,
                                       "idx": list(range(len(labels)))})


def test_apply_label_noise_keeps_the_clean_labels_and_checks_its_settings():
    ds, changed = apply_label_noise(_dataset([0, 1] * 50), get_task("sst2"), LabelNoiseConfig(rate=0.3, seed=2))
    assert changed == 30 and sum(a != b for a, b in zip(list(ds["label"]), list(ds["clean_label"]))) == 30
    assert list(ds["clean_label"]) == [0, 1] * 50 and list(ds["idx"]) == list(range(100))
    with pytest.raises(DskdError, match=r"`data.label_noise.flip.1`: 1 -> 1 is not a change"):
        apply_label_noise(_dataset([0, 1]), get_task("sst2"), LabelNoiseConfig(0.3, "asymmetric", flip={"1": 1}))
    with pytest.raises(DskdError, match="stsb is a regression task"):
        apply_label_noise(_dataset([0.5, 1.0]), get_task("stsb"), LabelNoiseConfig(rate=0.3))


def test_noise_settings_are_checked_at_load(tmp_path):
    for noise, message in (({"rate": 1.5}, r"`data.label_noise.rate` must be in \[0, 1\]"),
                           ({"rate": 0.2, "flip": {"0": 1}}, r"`data.label_noise.flip` maps classes for `kind: asym"),
                           ({"kind": "symmetric"}, r"missing required key\(s\) `data.label_noise.rate`")):
        with pytest.raises(DskdError, match=message):
            load_experiment(write_config(tmp_path / "n.yaml", {"data.label_noise": noise}))
    with pytest.raises(DskdError, match=r"`data.holdout` .* must be in \[0, 1\)"):
        load_experiment(write_config(tmp_path / "h.yaml", {"data.holdout": 1.0}))


def test_holdout_is_a_seeded_disjoint_split_that_keeps_indices():
    ds = _dataset([0, 1] * 50)
    train, held = split_holdout(ds, 0.1, seed=3)
    assert len(train) == 90 and len(held) == 10
    assert sorted(list(train["idx"]) + list(held["idx"])) == list(range(100))
    assert list(held["idx"]) == list(split_holdout(ds, 0.1, seed=3)[1]["idx"])
    assert list(held["idx"]) != list(split_holdout(ds, 0.1, seed=4)[1]["idx"])
    assert split_holdout(ds, 0.0, seed=3) == (ds, None)


# ------------------------------------------------------------------- mitigations


def test_noise_adaptive_kd_trusts_the_teacher_more_as_it_disagrees_with_more_labels():
    term = build_loss_terms({"n": {"weight": 1.0, "type": "noise_adaptive_kd", "temperature": 2.0,
                                   "alpha_min": 0.5, "alpha_max": 0.9, "r_full": 0.4, "momentum": 0.5}})["n"]
    zs = torch.tensor([[0.5, -0.5], [1.0, 0.0], [0.0, 2.0], [0.3, 0.3]], requires_grad=True)
    zt = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])  # the teacher disagrees with 2 of 4
    got = term({"logits": zs}, {"logits": zt, "labels": labels}, None)
    # One update with momentum 0.5, bias-corrected: r = 0.5 -> alpha = 0.5 + 0.4 * min(1, 0.5 / 0.4) = 0.9.
    assert term.noise_estimate() == pytest.approx(0.5) and term.alpha() == pytest.approx(0.9)
    ce = F.cross_entropy(zs, labels)
    kd = 4 * sum(F.kl_div(F.log_softmax(zs[i] / 2, -1), F.softmax(zt[i] / 2, -1), reduction="sum")
                 for i in range(4)) / 4
    assert got.item() == pytest.approx((0.1 * ce + 0.9 * kd).item(), rel=1e-6)
    # A second batch where the teacher agrees with every label: the running mean 0.5 * 0.5 = 0.25
    # becomes 0.5 * 0.25 + 0.5 * 0 = 0.125, bias-corrected by 1 - 0.5^2: r = 1/6.
    term({"logits": zs}, {"logits": zt, "labels": zt.argmax(-1)}, None)
    assert term.noise_estimate() == pytest.approx(1 / 6)
    assert term.alpha() == pytest.approx(0.5 + 0.4 * (1 / 6) / 0.4)
    assert set(term.extra_logs()) == {"alpha", "noise_estimate"}
    state = term.state_dict()
    assert set(state) == {"disagreement", "updates"}  # in every checkpoint
    term.eval()
    with torch.no_grad():
        term({"logits": zs}, {"logits": zt, "labels": labels}, None)
    assert int(term.updates) == 2  # evaluation passes do not move the estimate


def test_small_loss_ce_leaves_out_the_largest_losses_as_the_ramp_grows():
    term = build_loss_terms({"small_loss_ce": {"weight": 1.0, "drop": 0.5, "ramp": 0.5}})["small_loss_ce"]
    zs = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 0])
    each = F.cross_entropy(zs, labels, reduction="none")
    term.progress = 0.0
    assert term({"logits": zs}, {"labels": labels}, None).item() == pytest.approx(each.mean().item())
    term.progress = 0.25  # half-way up the ramp: drop 25%, i.e. one of four
    assert term({"logits": zs}, {"labels": labels}, None).item() == pytest.approx(
        (each.sum() - each.max()).item() / 3)
    term.progress = 0.9  # full: keep the two smallest
    want = sorted(each.tolist())[:2]
    assert term({"logits": zs}, {"labels": labels}, None).item() == pytest.approx(sum(want) / 2)
    assert term.extra_logs()["kept"].item() == 0.5
    assert not term.uses_teacher and math.isclose(term.dropped_share(), 0.5)


# ------------------------------------------------------------------------- runs

NOISY = {
    "data.label_noise": {"rate": 0.25, "seed": 3},
    "losses": {"noise_adaptive_kd": {"weight": 1.0, "temperature": 2.0},
               "small_loss_ce": {"weight": 0.5, "drop": 0.25}},
    "training.save_every": 5,
}


@pytest.mark.slow
def test_noisy_labels_run_logs_the_noise_and_resumes_exactly_on_two_ranks(session_tmp):
    cfg = write_config(session_tmp / "noisy.yaml", NOISY)
    full, split = session_tmp / "noisy-full", session_tmp / "noisy-split"
    log = run_dskd(["distill", "--config", cfg, "--output", full], session_tmp)
    assert log.returncode == 0, log.stderr[-3000:]
    assert "[data] label noise (symmetric, rate 0.25, seed 3): 64 of 256 training labels changed" in log.stderr
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=11"],
                    session_tmp).returncode == 0
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp).returncode == 0
    assert_same_run(full, split)
    two = run_dskd(["distill", "--config", cfg, "--output", session_tmp / "noisy-2r", "--deepspeed",
                    "ds_configs/zero2_fp32.json"], session_tmp, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
