"""Objectives that change over a stage (Annealing-KD, Continuation-KD) and `keep_best` stages:
the losses by hand, the schedule the trainer feeds them, the best-weights restore, resume in
the middle of the schedule and 2-rank runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_same_run, run_dskd, write_config
from dskd.training.checkpoint import consolidated_state_dict, latest_tag
from dskd.config import StageConfig, TrainingConfig
from dskd.methods import load_experiment
from dskd.errors import DskdError
from dskd.losses import build_loss_terms
from dskd.training.module import DistillationModule
from dskd.training.stages import plan_stages


def _term(name: str, **spec):
    return build_loss_terms({name: {"weight": 1.0, **spec}})[name]


# ------------------------------------------------------------------ Annealing-KD


def test_annealing_factor_rises_in_equal_steps_to_one_over_the_stage():
    term = _term("annealing_kd", max_temperature=4)
    stage = plan_stages([], {"annealing_kd": {"weight": 1.0}}, TrainingConfig(epochs=2), 8)[0]
    assert (stage.start, stage.end) == (0, 16)  # 16 steps: the factor is k/4 for 4 steps each
    factors = []
    for step in range(16):
        term.progress = stage.progress(step)
        factors.append(term.factor())
    assert factors == [0.25] * 4 + [0.5] * 4 + [0.75] * 4 + [1.0] * 4


def test_annealing_loss_is_mse_against_the_scaled_teacher_logits():
    term = _term("annealing_kd", max_temperature=7)
    zs = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    zt = torch.tensor([[7.0, 14.0], [-7.0, 0.0]])
    term.progress = 2.5 / 7  # third share of the stage: factor 3/7
    want = ((1 - 3) ** 2 + (-2 - 6) ** 2 + (0.5 + 3) ** 2 + (3 - 0) ** 2) / 4
    got = term({"logits": zs}, {"logits": zt}, torch.ones(2, 3))
    assert got.item() == pytest.approx(want)
    assert term.factor() == pytest.approx(3 / 7)


# --------------------------------------------------------------- Continuation-KD


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.75, 0.99])
def test_continuation_loss_by_hand_along_the_stage(progress):
    term = _term("continuation_kd", temperature=2.0, start_temperature=8.0, margin=0.05, ramp=0.8)
    term.progress = progress
    zs = [[1.0, -1.0, 0.5], [0.0, 2.0, -3.0]]
    zt = [[3.0, -2.0, 0.0], [0.1, 1.9, -2.9]]
    lam = min(1.0, progress / 0.8)
    tau = 8.0 ** (1 - lam) * 2.0 ** lam
    margin = 0.05 * (1 - lam)
    rows = [tau * tau * _kl(_softmax(t, tau), _softmax(s, tau)) for s, t in zip(zs, zt)]
    want = sum(max(0.0, r - margin) for r in rows) / 2
    got = term({"logits": torch.tensor(zs, dtype=torch.float64)}, {"logits": torch.tensor(zt, dtype=torch.float64)},
               torch.ones(2, 4))
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert term.current() == pytest.approx((tau, margin))
    if progress == 0.0:  # the second example is inside the dead zone at the start
        assert rows[1] < margin and got.item() == pytest.approx((rows[0] - margin) / 2)


def test_continuation_ends_as_the_standard_soft_label_loss():
    cont = _term("continuation_kd", temperature=3.0, start_temperature=10.0, margin=1.0, ramp=0.5)
    soft = _term("soft_kd", temperature=3.0)
    zs, zt = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.randn(5, 4)
    cont.progress = 0.6  # past the ramp
    assert cont({"logits": zs}, {"logits": zt}, None).item() == pytest.approx(
        soft({"logits": zs}, {"logits": zt}, None).item(), rel=1e-6)


def test_continuation_regression_has_a_shrinking_dead_zone():
    term = _term("continuation_kd", margin=0.5)
    zs, zt = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.3], [3.0]])
    term.progress = 0.0
    assert term({"logits": zs}, {"logits": zt}, None).item() == pytest.approx((1.0 - 0.5) ** 2 / 2)
    term.progress = 0.5
    assert term({"logits": zs}, {"logits": zt}, None).item() == pytest.approx(((0.3 - 0.25) ** 2 + 0.75 ** 2) / 2)


def test_continuation_rejects_bad_settings_by_key(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"losses": {"continuation_kd": {"weight": 1.0, "ramp": 0.0}}})
    with pytest.raises(DskdError, match=r"`losses.continuation_kd`: ramp"):
        load_experiment(cfg)


def test_the_trainer_hands_every_term_its_stage_progress():
    module = DistillationModule(torch.nn.Linear(1, 1), build_loss_terms(
        {"annealing_kd": {"weight": 1.0}, "continuation_kd": {"weight": 1.0}}), frozenset({"logits"}))
    spec = [StageConfig("a", steps=10), StageConfig("b", steps=30)]
    stages = plan_stages(spec, {"annealing_kd": {"weight": 1.0}}, TrainingConfig(), 5)
    module.set_progress(stages[1].progress(25))
    assert [t.progress for t in module.terms.values()] == [0.5, 0.5]
    assert stages[0].progress(0) == 0.0 and stages[0].progress(9) == 0.9


def test_keep_best_cannot_be_combined_with_per_layer(tmp_path):
    cfg = write_config(tmp_path / "k.yaml", {
        "losses": {"attention_kl": {"weight": 1.0}},
        "schedule": [{"name": "pid", "epochs": 1, "per_layer": "progressive", "keep_best": True}]})
    with pytest.raises(DskdError, match=r"`schedule\[0\]` \(pid\) sets both `keep_best` and `per_layer`"):
        load_experiment(cfg)


# --------------------------------------------------------- runs: restore, resume, 2 ranks

ANNEALING = {
    "losses": {"hard_ce": {"weight": 1.0}, "annealing_kd": {"weight": 1.0, "max_temperature": 4}},
    "schedule": [{"name": "anneal", "epochs": 1, "losses": {"annealing_kd": 1.0}, "keep_best": True},
                 {"name": "labels", "epochs": 1, "losses": {"hard_ce": 1.0}}],
    "training.eval_every": 3,
    "training.save_every": 5,
    "training.lr_schedule": "per_stage",
}
CONTINUATION = {
    "losses": {"hard_ce": {"weight": 1.0},
               "continuation_kd": {"weight": 1.0, "temperature": 2.0, "start_temperature": 6.0, "margin": 0.05}},
    "schedule": [{"name": "continuation", "epochs": 1.5, "losses": {"continuation_kd": 1.0}},
                 {"name": "labels", "epochs": 0.5, "losses": {"hard_ce": 1.0}}],
    "training.save_every": 5,
    "training.lr_schedule": "per_stage",
}


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run, tag=None, folder="checkpoints"):
    ckpt = run / folder
    return consolidated_state_dict(ckpt, tag or latest_tag(ckpt), json.loads((run / "run.json").read_text())["zero_stage"])


@pytest.mark.slow
def test_keep_best_restores_the_best_phase_one_weights_and_resumes_exactly(session_tmp):
    # lr 0.2 makes the student get worse after its first evaluations, so the best is an early one.
    cfg = write_config(session_tmp / "annealing.yaml", dict(ANNEALING, **{"training.lr": 0.2}))
    full, at_end, mid = (session_tmp / f"ann-{n}" for n in ("full", "end", "mid"))
    log = _ok(run_dskd(["distill", "--config", cfg, "--output", full], session_tmp)).stderr
    restored = [line for line in log.splitlines() if "continuing from its best weights" in line]
    assert len(restored) == 1
    best_step = int(restored[0].split("step ")[-1].split(" ")[0])
    assert best_step < 16, restored  # an earlier evaluation won, so the restore is a real load

    # Halted right at the end of phase 1: the checkpoint written there holds the restored weights.
    _ok(run_dskd(["distill", "--config", cfg, "--output", at_end, "--set", "training.halt_after_steps=16"],
                 session_tmp))
    end, best = _weights(at_end), _weights(at_end, f"step{best_step:08d}", "stage_best")
    assert end.keys() == best.keys() and all(torch.equal(end[k], best[k]) for k in end)

    _ok(run_dskd(["distill", "--config", cfg, "--output", at_end, "--resume"], session_tmp))
    assert_same_run(full, at_end)
    # Halted inside phase 1 after a best checkpoint was written: the resumed run still
    # remembers it and restores the same weights.
    _ok(run_dskd(["distill", "--config", cfg, "--output", mid, "--set", "training.halt_after_steps=10"], session_tmp))
    _ok(run_dskd(["distill", "--config", cfg, "--output", mid, "--resume"], session_tmp))
    assert_same_run(full, mid)
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["step"] == 32


@pytest.mark.slow
def test_continuation_resumes_mid_ramp_exactly_and_runs_on_two_ranks(session_tmp):
    cfg = write_config(session_tmp / "continuation.yaml", CONTINUATION)
    full, split = session_tmp / "cont-full", session_tmp / "cont-split"
    _ok(run_dskd(["distill", "--config", cfg, "--output", full], session_tmp))
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=11"],
                 session_tmp))
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp))
    assert_same_run(full, split)
    two = _ok(run_dskd(["distill", "--config", cfg, "--output", session_tmp / "cont-2r", "--deepspeed",
                        "ds_configs/zero2_fp32.json"], session_tmp, nproc=2))
    assert "[stage] step 12: continuation -> labels" in two.stderr


@pytest.mark.slow
def test_keep_best_restores_under_zero3_on_two_ranks(session_tmp):
    cfg = write_config(session_tmp / "annealing-z3.yaml", dict(ANNEALING, **{"training.lr": 0.2}))
    out = session_tmp / "ann-z3"
    log = _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--deepspeed", "ds_configs/zero3_fp32.json",
                        "--set", "training.halt_after_steps=8"], session_tmp, nproc=2)).stderr
    restored = [line for line in log.splitlines() if "continuing from its best weights" in line]
    assert len(restored) == 1, log[-3000:]
    best_step = int(restored[0].split("step ")[-1].split(" ")[0])
    assert best_step < 8, restored  # a real load of partitioned weights, not the stage's last state
    end, best = _weights(out), _weights(out, f"step{best_step:08d}", "stage_best")
    assert all(torch.equal(end[k], best[k]) for k in end)


# ------------------------------------------------------------------------ Pro-KD


def test_teacher_side_switches_teachers_and_moves_its_hooks():
    from test_internal import _tiny_bert

    from dskd.models.capture import QKCapture
    from dskd.teacher.online import TeacherSide

    first, second = _tiny_bert(2, 16, 4, 0), _tiny_bert(2, 16, 4, 1)
    side = TeacherSide(first, QKCapture(first, [2], "teacher"))
    batch = {"input_ids": torch.randint(1, 60, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    needs = frozenset({"logits", "attention_qk"})
    before = side.outputs(batch, needs, ((1, 2),))
    assert side.use("b", lambda source: second) and not side.use("b", lambda source: 1 / 0)  # loaded once
    after = side.outputs(batch, needs, ((1, 2),))
    want = second(**batch)["logits"]
    assert torch.equal(after["logits"], want) and not torch.equal(before["logits"], want)
    q, _ = after["attention_qk"][0]
    blocks = second.bert.encoder.layer
    assert q.shape == (2, 4, 5, 4) and not torch.equal(q, before["attention_qk"][0][0])
    assert not first.bert.encoder.layer[1].attention.self.query._forward_hooks  # the old hooks are gone
    assert blocks[1].attention.self.query._forward_hooks


def test_stage_teachers_are_refused_with_a_cache_and_when_shapes_differ(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"teacher.cache": str(tmp_path / "cache"),
                                              "schedule": [{"name": "early", "epochs": 1, "teacher": "x"}]})
    with pytest.raises(DskdError, match=r"`schedule\[0\].teacher` \(early\) switches teachers, but `teacher.cache`"):
        load_experiment(cfg)

    from types import SimpleNamespace

    from dskd.data import get_task
    from dskd.methods.pro_kd import check_stage_teachers

    other = tmp_path / "other"
    from transformers import BertConfig

    BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100,
               num_labels=2).save_pretrained(other)
    main = SimpleNamespace(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=100,
                           model_type="bert")
    cfg = load_experiment(write_config(tmp_path / "d.yaml", {"schedule": [{"name": "s", "epochs": 1},
                                                                      {"name": "early", "epochs": 1,
                                                                       "teacher": str(other)}]}))
    with pytest.raises(DskdError, match=r"`schedule\[1\].teacher` \(early: .*\) differs in shape from the main "
                                        r"teacher \(num_hidden_layers 3 vs 2\)"):
        check_stage_teachers(cfg, get_task("sst2"), main)
    cfg.schedule[1].teacher = str(tmp_path / "missing")
    with pytest.raises(DskdError, match=r"`schedule\[1\].teacher` points to .*missing, which does not exist"):
        check_stage_teachers(cfg, get_task("sst2"), main)


@pytest.mark.slow
def test_pro_kd_follows_the_teachers_trajectory_resumes_and_runs_on_two_ranks(session_tmp):
    teacher = session_tmp / "pro-teacher"
    _ok(run_dskd(["finetune", "--config", write_config(session_tmp / "pro-ft.yaml", {"finetune.trajectory": True}),
                  "--output", teacher, "--set", "finetune.epochs=3"], session_tmp))
    exported = sorted(p.name for p in (teacher / "trajectory").iterdir())
    assert exported == ["step00000016", "step00000032", "step00000048"]  # every epoch, none rotated away
    from safetensors.torch import load_file

    last, final = (load_file(str(p / "model.safetensors")) for p in (teacher / "trajectory" / exported[-1],
                                                                      teacher / "model"))
    assert all(torch.equal(last[k], final[k]) for k in final)

    stages = [{"name": "epoch1", "epochs": 0.5, "teacher": str(teacher / "trajectory" / exported[0])},
              {"name": "epoch2", "epochs": 0.5, "teacher": "trajectory:-2"},  # the same as exported[1]
              {"name": "final", "epochs": 1}]
    pro = {"teacher": {"path": str(teacher)}, "schedule": stages, "training.save_every": 5,
           "losses": {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0},
                      "attention_kl": {"weight": 1.0}}}
    cfg = write_config(session_tmp / "pro.yaml", pro)
    full, split = session_tmp / "pro-full", session_tmp / "pro-split"
    log = _ok(run_dskd(["distill", "--config", cfg, "--output", full], session_tmp)).stderr
    assert f"[teacher] stage epoch2 distils from {teacher / 'trajectory' / exported[1]}" in log
    # Halted inside the second stage: the resumed run must load that stage's teacher again.
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, "--set", "training.halt_after_steps=11"],
                 session_tmp))
    _ok(run_dskd(["distill", "--config", cfg, "--output", split, "--resume"], session_tmp))
    assert_same_run(full, split)
    # The early teachers matter: the same schedule with the final teacher throughout ends elsewhere.
    plain = write_config(session_tmp / "pro-plain.yaml",
                         dict(pro, schedule=[dict(s, teacher=None) for s in stages]))
    _ok(run_dskd(["distill", "--config", plain, "--output", session_tmp / "pro-plain"], session_tmp))
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(session_tmp / "pro-plain" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    two = _ok(run_dskd(["distill", "--config", cfg, "--output", session_tmp / "pro-2r", "--deepspeed",
                        "ds_configs/zero1_fp32.json"], session_tmp, nproc=2))
    assert "[teacher] stage final distils from" in two.stderr


def test_trajectory_references_pick_the_exports_by_step(tmp_path):
    from dskd.methods.pro_kd import resolve_stage_teacher

    for tag in ("step00000032", "step00000016", "step00000048"):
        (tmp_path / "t" / "trajectory" / tag).mkdir(parents=True)
        (tmp_path / "t" / "trajectory" / tag / "config.json").write_text("{}")
    cfg = load_experiment(write_config(tmp_path / "c.yaml", {"teacher": {"path": str(tmp_path / "t")}}))
    folder = tmp_path / "t" / "trajectory"
    assert resolve_stage_teacher(cfg, "trajectory:1", "k") == str(folder / "step00000016")
    assert resolve_stage_teacher(cfg, "trajectory:-1", "k") == str(folder / "step00000048")
    assert resolve_stage_teacher(cfg, "/some/path", "k") == "/some/path"
    with pytest.raises(DskdError, match=r"`k`: 'trajectory:4' but .* holds 3 exported teacher\(s\); fine-tune"):
        resolve_stage_teacher(cfg, "trajectory:4", "k")
    with pytest.raises(DskdError, match=r"must be trajectory:K"):
        resolve_stage_teacher(cfg, "trajectory:0", "k")


def test_the_global_schedule_is_transformers_linear_schedule_with_warmup():
    """One stage, `lr_schedule: global`: the same factors as transformers' own schedule, bit for
    bit (ours also restarts per stage, follows plateau-shortened stages and methods' LRs)."""
    from transformers import get_linear_schedule_with_warmup

    from dskd.training.stages import Stage, lr_factor

    for total, ratio in ((50, 0.1), (7, 0.0), (33, 0.3)):
        training = TrainingConfig(warmup_ratio=ratio)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        theirs = get_linear_schedule_with_warmup(optimizer, int(ratio * total), total)
        stages = [Stage("train", 0, total, {"hard_ce": 1.0})]
        assert [lr_factor(step, stages, training) for step in range(total + 2)] == \
            [theirs.lr_lambdas[0](step) for step in range(total + 2)]
