"""SWA: the LR schedule and averaging steps, the running mean by hand, the swap in and out,
and real runs whose exported model is the mean of the checkpointed weights (1 rank, and
2 ranks under ZeRO-3), with an exact resume in the middle of the averaging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_dskd, write_config
from dskd.config import SwaConfig
from dskd.methods import load_experiment
from dskd.errors import DskdError
from dskd.methods.swa import WeightAverage, averages_at, start_step, swa_lr_factor


def test_averaging_steps_start_at_the_configured_share_and_include_the_last_step():
    cfg = SwaConfig(start=0.5, every=3)
    assert start_step(cfg, 20) == 10
    assert [s for s in range(1, 21) if averages_at(cfg, s, 20)] == [10, 13, 16, 19, 20]


def test_constant_and_cyclic_swa_learning_rates():
    assert swa_lr_factor(SwaConfig(start=0.5, lr_high=0.4), 8, 20) is None  # step 9: before the SWA phase
    assert swa_lr_factor(SwaConfig(start=0.5, lr_high=0.4), 9, 20) == 0.4
    cyclic = SwaConfig(start=0.5, every=4, lr="cyclic", lr_high=1.0, lr_low=0.2)
    # 0-based steps 9.. are 1-based 10..: 10 is averaged (low), then a cycle falls to the next average at 14.
    assert [round(swa_lr_factor(cyclic, s, 20), 6) for s in range(9, 14)] == [0.2, 0.8, 0.6, 0.4, 0.2]


def test_the_trainer_uses_the_swa_learning_rate_in_the_swa_phase():
    from dskd.config import ExperimentConfig, TrainingConfig
    from dskd.methods import enabled_methods
    from dskd.training.stages import Stage, lr_factor

    training = TrainingConfig(warmup_ratio=0.0, swa=SwaConfig(start=0.5, lr_high=0.3))
    methods = enabled_methods(ExperimentConfig(training=training), "distill")  # the SWA plugin, through its hook
    stages = [Stage("train", 0, 10, {"hard_ce": 1.0})]
    assert [round(lr_factor(s, stages, training, methods), 6) for s in range(10)] == [1.0, 0.9, 0.8, 0.7, 0.3, 0.3,
                                                                                       0.3, 0.3, 0.3, 0.3]
    assert [round(lr_factor(s, stages, training), 6) for s in range(10)][4:6] == [0.6, 0.5]  # no plugin: linear


def test_running_mean_and_the_swap_in_and_out():
    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    average = WeightAverage(model)
    snapshots = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]]), torch.tensor([[2.0, 6.0]])]
    for w in snapshots:
        model.weight.data.copy_(w)
        average.update()
    assert average.count == 3 and set(average.average) == {"weight", "bias"}  # trainable weights only
    assert torch.allclose(average.average["weight"], torch.tensor([[2.0, 2.0]]))
    model.weight.data.copy_(torch.tensor([[9.0, 9.0]]))
    with average.applied():
        assert torch.equal(model.weight.data, average.average["weight"])
    assert torch.equal(model.weight.data, torch.tensor([[9.0, 9.0]]))  # the trained weights are back, exactly
    again = WeightAverage(model)
    again.load_state_dict(average.state_dict())
    assert again.count == 3 and torch.equal(again.average["weight"], average.average["weight"])


def test_swa_settings_are_checked_by_key(tmp_path):
    for swa, message in (({"start": 1.0}, r"`training.swa.start` .* must be in \[0, 1\)"),
                         ({"every": 0}, r"`training.swa.every` must be at least 1"),
                         ({"lr": "cyclic", "lr_high": 0.1, "lr_low": 0.5}, r"`training.swa.lr_low` must be in"),
                         ({"lr": "step"}, r"`training.swa.lr` must be 'constant' or 'cyclic'")):
        with pytest.raises(DskdError, match=message):
            load_experiment(write_config(tmp_path / "s.yaml", {"training.swa": swa}))
    with pytest.raises(DskdError, match=r"`schedule\[0\].keep_best` \(a\) rewinds the student .* use one of them"):
        load_experiment(write_config(tmp_path / "k.yaml", {"training.swa": {}, "schedule": [
            {"name": "a", "epochs": 1, "keep_best": True}]}))


SWA = {
    "losses": {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}},
    "training.swa": {"start": 0.5, "every": 2, "lr": "cyclic", "lr_high": 0.5, "lr_low": 0.1},
    "training.save_every": 1,
    "training.keep_checkpoints": 40,
}


def _raw_mean(run: Path, steps: list[int], zero_stage: int) -> dict[str, torch.Tensor]:
    from dskd.training.checkpoint import consolidated_state_dict

    raw = [consolidated_state_dict(run / "checkpoints", f"step{s:08d}", zero_stage) for s in steps]
    return {k[len("model."):]: sum(r[k] for r in raw) / len(raw) for k in raw[0] if k.startswith("model.")}


def _exported(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_swa_exports_the_mean_of_the_averaged_steps_and_resumes_exactly(session_tmp):
    cfg = write_config(session_tmp / "swa.yaml", SWA)
    full, split = session_tmp / "swa-full", session_tmp / "swa-split"
    _ok(run_dskd(["distill", "--config", cfg, "--output", full], session_tmp))
    # 32 steps, averaging from step 16 every 2 steps: 16, 18, ..., 32.
    want, got = _raw_mean(full, list(range(16, 33, 2)), 0), _exported(full)
    assert want.keys() >= got.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    last = _raw_mean(full, [32], 0)
    assert any(not torch.allclose(got[k], last[k], atol=1e-4) for k in got)  # not the last weights
    # The final metrics are those of the averaged model.
    evaluated = _ok(run_dskd(["evaluate", "--model", full / "model", "--config", cfg], session_tmp))
    metrics = json.loads((full / "metrics.json").read_text())
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["accuracy"] == metrics["accuracy"]
    rows = [json.loads(line) for line in (full / "dev_predictions.jsonl").read_text().splitlines()]
    assert sum(r["predicted"] == r["label"] for r in rows) / len(rows) == metrics["accuracy"]  # the averaged model's
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=21"],
                 session_tmp))
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp))
    other = _exported(split)
    assert all(torch.equal(got[k], other[k]) for k in got)
    assert json.loads((split / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_swa_under_zero3_on_two_ranks_averages_the_gathered_weights(session_tmp):
    cfg = write_config(session_tmp / "swa-z3.yaml", SWA)
    out = session_tmp / "swa-z3"
    _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--deepspeed", "ds_configs/zero3_fp32.json"],
                 session_tmp, nproc=2))
    # 2 ranks: 16 steps, averaging from step 8 every 2 steps.
    want, got = _raw_mean(out, list(range(8, 17, 2)), 3), _exported(out)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
