"""End-to-end runs of the real CLI, as processes, on CPU with DeepSpeed and gloo."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import SHARED_GLUE, needs_shared, run_dskd, tree_digest, write_config

pytestmark = pytest.mark.slow


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def _weights(model_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir).state_dict()


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def two_rank_run(session_tmp):
    out = session_tmp / "zero2"
    cfg = write_config(session_tmp / "zero2.yaml")
    proc = _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--deepspeed", "ds_configs/zero2_fp32.json"],
                        session_tmp, nproc=2))
    return out, proc


def test_two_rank_zero2_distill_writes_scalars_checkpoint_and_metrics(two_rank_run):
    out, proc = two_rank_run
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["zero_stage"] == 2 and run["status"] == "completed"
    # 256 examples / (2 ranks x 16) = 8 steps per epoch, 2 epochs.
    scalars = _scalars(out / "tensorboard")
    for tag in ("train/loss/hard_ce", "train/loss/soft_kd", "train/loss/total", "train/lr", "train/samples_per_s"):
        steps = [s for s, _ in scalars[tag]]
        assert steps == [2, 4, 6, 8, 10, 12, 14, 16], tag
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    for (_, total), (_, ce), (_, kd) in zip(
        scalars["train/loss/total"], scalars["train/loss/hard_ce"], scalars["train/loss/soft_kd"], strict=True
    ):
        assert total == pytest.approx(0.5 * ce + 0.5 * kd, rel=1e-5)
    assert [s for s, _ in scalars["eval/accuracy"]] == [8, 16]
    assert "teacher/accuracy" in scalars
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "sst2" and metrics["step"] == 16
    assert metrics["accuracy"] == pytest.approx(scalars["eval/accuracy"][-1][1])
    assert metrics["teacher"]["accuracy"] == pytest.approx(scalars["teacher/accuracy"][0][1])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000016"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step00000008", "step00000016"]
    assert "student dev: {" in proc.stdout and "teacher dev: {" in proc.stdout
    # Every dev example's prediction by the final weights, gathered from both ranks in dataset order.
    rows = [json.loads(line) for line in (out / "dev_predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(64))
    assert all(r["predicted"] == max(range(2), key=r["output"].__getitem__) for r in rows)
    assert sum(r["predicted"] == r["label"] for r in rows) / 64 == pytest.approx(metrics["accuracy"])


def test_export_round_trip_gives_the_same_dev_metrics(two_rank_run, session_tmp):
    out, _ = two_rank_run
    exported = session_tmp / "exported"
    _ok(run_dskd(["export", "--run", out, "--out", exported], session_tmp))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(exported)
    assert model.config.num_hidden_layers == 1 and len(AutoTokenizer.from_pretrained(exported)) == 30522
    for key, value in _weights(out / "model").items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    written = session_tmp / "exported-predictions.jsonl"
    proc = _ok(run_dskd(["evaluate", "--model", exported, "--config", session_tmp / "zero2.yaml",
                         "--predictions", written], session_tmp))
    evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(json.loads((out / "metrics.json").read_text())["accuracy"])
    # The same per-example file as the run's own (predictions equal, outputs to float tolerance).
    ours = [json.loads(line) for line in written.read_text().splitlines()]
    run = [json.loads(line) for line in (out / "dev_predictions.jsonl").read_text().splitlines()]
    assert [(r["row"], r["label"], r["predicted"]) for r in ours] == [(r["row"], r["label"], r["predicted"]) for r in run]
    assert ours[0]["output"] == pytest.approx(run[0]["output"], abs=1e-5)


@pytest.mark.parametrize("nproc, ds, grad_accum", [(1, "zero0_fp32", 2), (2, "zero2_fp32", 1)])
def test_resume_is_exact(session_tmp, nproc, ds, grad_accum, request):
    # One rank with accumulation: 16 micro-batches -> 8 optimizer steps per epoch, as on two ranks.
    cfg = write_config(session_tmp / f"resume-{ds}.yaml", {"training.save_every": 3, "training.grad_accum": grad_accum})
    common = ["--config", cfg, "--deepspeed", f"ds_configs/{ds}.json"]
    full, split = session_tmp / f"full-{ds}", session_tmp / f"split-{ds}"
    if nproc == 2:
        assert request.getfixturevalue("two_rank_reference") == full
    else:
        _ok(run_dskd(["distill", *common, "--output", full], session_tmp, nproc))
    # Stop mid-epoch (step 5 of 16 / 8 per epoch), as a preempted job would, then resume.
    halted = _ok(run_dskd(["distill", *common, "--output", split, "--set", "training.halt_after_steps=5"],
                          session_tmp, nproc))
    assert "halted after step 5" in halted.stderr
    assert json.loads((split / "run.json").read_text())["status"] == "halted"
    resumed = _ok(run_dskd(["distill", *common, "--output", split, "--resume"], session_tmp, nproc))
    assert "[resume] continuing from checkpoint step00000005 at step 5 of 16 (epoch 0)" in resumed.stderr
    assert json.loads((full / "metrics.json").read_text())["step"] == 16
    assert [s for s, _ in _scalars(full / "tensorboard")["eval/accuracy"]] == [8, 16]
    a, b = _weights(full / "model"), _weights(split / "model")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((full / "metrics.json").read_text()) == json.loads((split / "metrics.json").read_text())
    # Resuming a completed run changes nothing and reports the same result.
    before = tree_digest(split)
    again = _ok(run_dskd(["distill", *common, "--output", split, "--resume"], session_tmp, nproc))
    assert "already completed; nothing to resume" in again.stderr
    assert tree_digest(split) == before


def test_finetune_then_distill_from_the_run_folder(session_tmp):
    cfg = write_config(session_tmp / "ft.yaml")
    teacher_run = session_tmp / "ft-teacher"
    _ok(run_dskd(["finetune", "--config", cfg, "--output", teacher_run], session_tmp))
    finetuned = json.loads((teacher_run / "metrics.json").read_text())
    student_run = session_tmp / "ft-student"
    _ok(run_dskd(["distill", "--config", cfg, "--output", student_run, "--set", f"teacher.path={teacher_run}"], session_tmp))
    distilled = json.loads((student_run / "metrics.json").read_text())
    # The frozen teacher scores exactly what fine-tuning reported for it.
    assert distilled["teacher"]["accuracy"] == pytest.approx(finetuned["accuracy"])


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def previous_run(session_tmp):
    out = session_tmp / "previous"
    cfg = write_config(session_tmp / "previous.yaml", {"training.epochs": 1})
    _ok(run_dskd(["distill", "--config", cfg, "--output", out], session_tmp))
    return out


def _malformed_glue(root, body):
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(body)
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood movie \t1\n")
    return root


@pytest.mark.parametrize(
    "body, message",
    [
        ("sentence\tlabel\nfine\t1\nbroken\trow\t1\n", r"train.tsv:3: expected 2 tab-separated fields"),
        ("sentence\tlabel\n", r"train.tsv.* has no data rows"),
    ],
)
def test_bad_tsv_is_named_and_the_previous_run_kept(previous_run, session_tmp, tmp_path, body, message):
    before = tree_digest(previous_run)
    glue = _malformed_glue(tmp_path / "glue", body)
    cfg = write_config(tmp_path / "c.yaml", {"data.path": str(glue), "data.train_limit": None})
    proc = run_dskd(["distill", "--config", cfg, "--output", previous_run, "--overwrite"], session_tmp)
    assert proc.returncode == 2
    assert __import__("re").search(message, proc.stderr), proc.stderr[-2000:]
    assert tree_digest(previous_run) == before


def test_existing_run_is_not_overwritten_without_a_flag(previous_run, session_tmp):
    before = tree_digest(previous_run)
    cfg = write_config(session_tmp / "again.yaml", {"training.epochs": 1})
    proc = run_dskd(["distill", "--config", cfg, "--output", previous_run], session_tmp)
    assert proc.returncode == 2
    assert "already holds a run; continue it with --resume, replace it with --overwrite" in proc.stderr
    proc = run_dskd(["distill", "--config", write_config(session_tmp / "other.yaml"), "--output", previous_run,
                     "--resume"], session_tmp)
    assert proc.returncode == 2 and "--resume: the config differs" in proc.stderr and "training.epochs: 1.0 -> 2" in proc.stderr
    assert tree_digest(previous_run) == before


@needs_shared("glue", "RTE")
def test_data_path_points_at_real_glue_folders(session_tmp):
    cfg = write_config(session_tmp / "rte.yaml", {"data.task": "rte", "data.path": str(SHARED_GLUE),
                                                  "data.train_limit": 64, "training.epochs": 1})
    out = session_tmp / "rte"
    _ok(run_dskd(["distill", "--config", cfg, "--output", out], session_tmp))
    metrics = json.loads((out / "metrics.json").read_text())
    # RTE dev limited to 64 rows: accuracy is a multiple of 1/64.
    assert metrics["task"] == "rte" and (metrics["accuracy"] * 64) == pytest.approx(round(metrics["accuracy"] * 64))


@pytest.mark.parametrize("nproc, ds", [(2, "zero3_bf16"), (1, "zero1_bf16")])
def test_other_zero_stages_and_bf16_train_and_export(session_tmp, nproc, ds):
    out = session_tmp / f"stage-{ds}"
    # Joint internal + soft-label KD: bf16 Q/K and [CLS] vectors, losses accumulated in fp32.
    cfg = write_config(session_tmp / f"stage-{ds}.yaml", {"training.epochs": 1, "losses": INTERNAL["losses"]})
    _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--deepspeed", f"ds_configs/{ds}.json"],
                 session_tmp, nproc))
    run = json.loads((out / "run.json").read_text())
    assert (run["zero_stage"], run["dtype"], run["status"]) == (int(ds[4]), "bfloat16", "completed")
    scalars = _scalars(out / "tensorboard")
    for tag in ("train/loss/total", "train/loss/attention_kl/L1", "train/loss/cls_cosine/L1"):
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert any(v > 0 for _, v in scalars["train/loss/attention_kl/L1"])
    # The exported fp32 weights (consolidated from the ZeRO partitions) reproduce the
    # run's final dev accuracy up to bf16 rounding of the logits.
    proc = _ok(run_dskd(["evaluate", "--model", out, "--config", cfg], session_tmp))
    evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert evaluated["accuracy"] == pytest.approx(json.loads((out / "metrics.json").read_text())["accuracy"], abs=0.05)


INTERNAL = {
    "teacher.arch": {"layers": 4, "hidden": 32, "heads": 4, "intermediate": 64},
    "student.layers": 2,
    "losses": {"attention_kl": {"weight": 1.0}, "cls_cosine": {"weight": 1.0},
               "soft_kd": {"weight": 0.5, "temperature": 2.0}, "hard_ce": {"weight": 0.5}},
    "schedule": [
        {"name": "sid", "steps": 6, "per_layer": "stacked", "losses": {"attention_kl": 1.0, "cls_cosine": 1.0}},
        {"name": "soft", "epochs": 2, "losses": {"soft_kd": 0.5, "hard_ce": 0.5},
         "plateau": {"every": 2, "patience": 2, "batches": 2, "min_delta": 0.001}},
        {"name": "hard", "steps": 2, "losses": {"hard_ce": 1.0}},
    ],
    "training.lr_schedule": "per_stage",
    "training.save_every": 3,
}


def test_internal_kd_resume_mid_stage_and_after_plateau_checks_is_exact(session_tmp):
    cfg = write_config(session_tmp / "internal.yaml", INTERNAL)
    common = ["--config", cfg, "--deepspeed", "ds_configs/zero1_fp32.json"]
    full, split = session_tmp / "internal-full", session_tmp / "internal-split"
    proc = _ok(run_dskd(["distill", *common, "--output", full], session_tmp))
    assert "stages: sid-L1[0:3](attention_kl+cls_cosine layers 1), sid-L2[3:6](attention_kl+cls_cosine layers 1,2)" \
        in proc.stderr
    # Halt inside sid-L2, then inside the plateau stage after two checks, then finish.
    for halt in (4, 10):
        _ok(run_dskd(["distill", *common, "--output", split, *(["--resume"] if halt == 10 else []),
                      "--set", f"training.halt_after_steps={halt}"], session_tmp))
    _ok(run_dskd(["distill", *common, "--output", split, "--resume"], session_tmp))
    a, b = _weights(full / "model"), _weights(split / "model")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((full / "metrics.json").read_text()) == json.loads((split / "metrics.json").read_text())
    scalars = _scalars(full / "tensorboard")
    # SID: layer 1 is scored from the start, layer 2 only from stage sid-L2 (steps 4-6) on.
    assert [s for s, _ in scalars["train/loss/attention_kl/L1"]] == [2, 4, 6]
    assert [s for s, _ in scalars["train/loss/attention_kl/L2"]] == [4, 6]
    # The soft stage (at most 2 epochs) is checked every 2 steps and ends after two checks
    # without improvement; the hard stage then runs its 2 steps.
    assert [s for s, _ in scalars["plateau/soft"]] == [8, 10, 12]
    assert "[plateau] soft:" in proc.stderr and "[stage] step 12: soft -> hard" in proc.stderr
    assert json.loads((full / "metrics.json").read_text())["step"] == 14
    assert _scalars(split / "tensorboard")["plateau/soft"] == scalars["plateau/soft"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Tensors("stage/text_summary")] == [3, 6, 12]  # stage changes as text


def test_internal_kd_across_widths_and_heads_on_two_ranks_zero3(session_tmp):
    # Student 24 wide with 2 heads against a 32-wide, 4-head teacher: grouped heads and a
    # trainable [CLS] projection that ZeRO-3 partitions and the checkpoint keeps.
    cfg = write_config(session_tmp / "widths.yaml", {
        **INTERNAL, "schedule": [], "training.epochs": 1, "training.eval_every": 4, "training.attention_images": 2,
        "student.init_from_teacher": False, "student.layers": None,
        "student.arch": {"layers": 2, "hidden": 24, "heads": 2, "intermediate": 48},
    })
    out = session_tmp / "widths"
    _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--deepspeed", "ds_configs/zero3_fp32.json"],
                 session_tmp, nproc=2))
    from dskd.training.checkpoint import consolidated_state_dict, latest_tag

    state = consolidated_state_dict(out / "checkpoints", latest_tag(out / "checkpoints"), 3)
    assert state["terms.cls_cosine.projections.L1.weight"].shape == (32, 24)
    assert state["terms.cls_cosine.projections.L2.weight"].abs().sum() > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["attention/student_L1_teacher_L2", "attention/student_L2_teacher_L4"]
    images = acc.Images("attention/student_L2_teacher_L4")
    assert [e.step for e in images] == [4, 8]
    # A colour figure (teacher | student, two head rows, colour bars): not a grey map.
    import io

    from matplotlib.image import imread

    pixels = imread(io.BytesIO(images[0].encoded_image_string), format="png")
    assert pixels.shape[2] >= 3 and images[0].width > 200 and images[0].height > 200
    assert (abs(pixels[..., 0] - pixels[..., 2]) > 0.2).mean() > 0.05
    scalars = _scalars(out / "tensorboard")
    assert {"train/loss/attention_kl/L1", "train/loss/cls_cosine/L2"} <= set(scalars)


def test_a_run_started_before_new_config_keys_existed_still_resumes(tmp_path):
    import yaml

    from dskd.config import to_dict
    from dskd.methods import load_experiment
    from dskd.training.run_dir import CONFIG_FILE, _diff_configs, saved_config

    cfg = load_experiment(write_config(tmp_path / "c.yaml"))
    old = to_dict(cfg)
    for section, key in (("data", "holdout"), ("data", "label_noise"), ("training", "trajectory"),
                         ("training", "swa")):
        del old[section][key]  # what an older dskd wrote: these keys did not exist yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CONFIG_FILE).write_text(yaml.safe_dump(old))
    assert _diff_configs(saved_config(tmp_path / "run"), to_dict(cfg)) == []
    old["training"]["epochs"] = 9.0  # a real change is still reported
    (tmp_path / "run" / CONFIG_FILE).write_text(yaml.safe_dump(old))
    assert _diff_configs(saved_config(tmp_path / "run"), to_dict(cfg)) == [f"training.epochs: 9.0 -> {cfg.training.epochs}"]
