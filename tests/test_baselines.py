"""Baselines: PKD's patient term by hand, its layer selection, a 2-rank run and an exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_dskd, write_config
from dskd.errors import DskdError
from dskd.losses import LayerGeometry, build_loss_terms


def _normalise(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_pkd_term_against_a_hand_computation():
    terms = build_loss_terms({"pkd": {"weight": 1.0}}, LayerGeometry(((1, 2), (2, 4), (3, 6)), 3, 3, 1, 1))
    pkd = terms["pkd"]
    assert [pkd.compares(p) for p in ((1, 2), (2, 4), (3, 6))] == [True, True, False]  # top layer: soft KD's
    hs = [[[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], [[1.0, 0.0, 0.0], [2.0, 2.0, 1.0]]]
    ht = [[[2.0, 1.0, 2.0], [0.0, 4.0, 3.0]], [[0.0, 1.0, 0.0], [1.0, 2.0, 2.0]]]
    student = {"pairs": ((1, 2), (2, 4)), "cls": [torch.tensor(h) for h in hs]}
    teacher = {"cls": [torch.tensor(h) for h in ht]}
    got = pkd.pair_losses(student, teacher, torch.ones(2, 3))
    for layer in range(2):
        pairs = zip(hs[layer], ht[layer])
        want = sum(sum((a - b) ** 2 for a, b in zip(_normalise(s), _normalise(t))) for s, t in pairs) / 6
        assert got[layer].item() == pytest.approx(want, rel=1e-6)


def test_pkd_logs_only_the_layers_it_compares():
    from test_internal import _tiny_bert

    from dskd.trainer import DistillationModule

    teacher, student = _tiny_bert(4, 16, 4, 0), _tiny_bert(2, 16, 4, 1)
    pairs = ((1, 2), (2, 4))
    terms = build_loss_terms({"pkd": {"weight": 1.0}}, LayerGeometry(pairs, 16, 16, 4, 4))
    module = DistillationModule(student, terms, frozenset({"logits", "cls"}))
    batch = {"input_ids": torch.randint(1, 60, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    from dskd.models import teacher_outputs

    total, values = module(batch, teacher_outputs(teacher, batch, module.needs, None, [2, 4]), {"pkd": 1.0}, pairs)
    assert set(values) == {"pkd", "pkd/L1"} and total.item() == pytest.approx(values["pkd/L1"].item())
    _, values = module(batch, teacher_outputs(teacher, batch, module.needs, None, [4]), {"pkd": 1.0}, ((2, 4),))
    assert values == {"pkd": values["pkd"]} and values["pkd"].item() == 0.0  # a stage of only the top layer


def test_pkd_needs_two_mapped_layers_to_leave_the_top_one_out():
    with pytest.raises(DskdError, match="`losses.pkd` with `exclude_last: true` needs at least 2 mapped layers"):
        build_loss_terms({"pkd": {"weight": 1.0}}, LayerGeometry(((1, 2),), 8, 8, 1, 1))


PKD = {
    "teacher.arch": {"layers": 4, "hidden": 32, "heads": 4, "intermediate": 64},
    "student.layers": 2,
    "losses": {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 5.0},
               "pkd": {"weight": 100.0}},
    "training.save_every": 5,
    "training.deepspeed": "ds_configs/zero1_fp32.json",
}


@pytest.mark.slow
def test_pkd_runs_on_two_ranks_and_resumes_exactly(session_tmp):
    cfg = write_config(session_tmp / "pkd.yaml", PKD)
    two = run_dskd(["distill", "--config", cfg, "--output", session_tmp / "pkd-2r", "--set", "training.epochs=1"],
                   session_tmp, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    full, split = session_tmp / "pkd-full", session_tmp / "pkd-split"
    assert run_dskd(["distill", "--config", cfg, "--output", full], session_tmp).returncode == 0
    assert run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=11"],
                    session_tmp).returncode == 0
    proc = run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(split / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((full / "metrics.json").read_text()) == json.loads((split / "metrics.json").read_text())
