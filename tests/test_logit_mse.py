"""The worked example of a method plugin (dskd/methods/logit_mse.py, docs/design.md): its loss
against a hand computation, its warm-up, its config errors, its run-level hook, and a real run
of its recipe in which the loop, which names no method, picks both parts up."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, run_dskd

from dskd.errors import DskdError
from dskd.losses import LOSS_REGISTRY, build_loss_terms
from dskd.methods import METHOD_REGISTRY, enabled_methods, load_experiment
from dskd.methods.logit_mse import LogitMSE, LogitMSEWarmup

RECIPE = REPO / "configs" / "examples" / "logit_mse.yaml"


def test_the_loss_is_the_mean_squared_logit_gap_times_the_warm_up_factor():
    term = build_loss_terms({"logit_mse": {"weight": 1.0, "warmup": 0.2}})["logit_mse"]
    zs = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    zt = torch.tensor([[0.0, 1.0], [0.5, 0.0]])
    gap = (1 + 4 + 0 + 4) / 4  # mean of the squared differences: 2.25
    for progress, factor in ((0.0, 0.0), (0.05, 0.25), (0.1, 0.5), (0.2, 1.0), (0.9, 1.0)):
        term.progress = progress
        assert float(term({"logits": zs}, {"logits": zt}, None)) == pytest.approx(factor * gap)
        assert float(term.extra_logs()["factor"]) == pytest.approx(factor)
    term.warmup = 0.0
    term.progress = 0.0
    assert float(term({"logits": zs}, {"logits": zt}, None)) == pytest.approx(gap)  # no warm-up: full weight


def test_the_gradient_reaches_the_student_only():
    term = LogitMSE(warmup=0.5)
    term.progress = 0.25  # factor 0.5
    zs = torch.tensor([[1.0, -1.0]], requires_grad=True)
    zt = torch.tensor([[0.0, 1.0]], requires_grad=True)
    term({"logits": zs}, {"logits": zt}, None).backward()
    torch.testing.assert_close(zs.grad, 0.5 * 2 * (zs - zt).detach() / 2)  # d/dzs of 0.5 * mean((zs - zt)^2)


def test_a_bad_warm_up_is_refused_naming_the_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(RECIPE.read_text())
    with pytest.raises(DskdError, match=r"`losses.logit_mse`: warmup is the share of a stage .* got 1.5"):
        load_experiment(config, ["losses.logit_mse.warmup=1.5"])


def test_the_plugin_registers_its_term_and_its_hook_by_itself():
    assert LOSS_REGISTRY["logit_mse"] is LogitMSE and METHOD_REGISTRY["logit_mse"] is LogitMSEWarmup
    cfg = load_experiment(RECIPE)
    assert [type(m) for m in enabled_methods(cfg, "distill")] == [LogitMSEWarmup]
    assert enabled_methods(cfg, "finetune") == []


@pytest.mark.slow
def test_the_recipe_runs_and_the_loop_calls_both_parts(tmp_path):
    out = tmp_path / "run"
    result = run_dskd(["distill", "--config", RECIPE, "--output", out, "--set", "data.train_limit=64",
                       "--set", "data.dev_limit=32", "--set", "data.max_length=32", "--set", "training.log_every=1"],
                      tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[logit_mse] losses.logit_mse: weight ramps 0 -> 1 over the first 25% of each stage" in result.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    factors = [e.value for e in events.Scalars("train/loss/logit_mse/factor")]
    # 64 examples / batch 16 = 4 steps; progress 0, 1/4, 2/4, 3/4 with a 25% warm-up
    assert factors == [0.0, 1.0, 1.0, 1.0]
    assert "train/loss/logit_mse" in events.Tags()["scalars"]
