"""Runs that cannot be lost: write-once verified checkpoints with fallback, kill -9 at the worst
moments, damaged files of every kind, and a table of bad inputs that must each end in one
line and leave the previous run untouched."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_same_run, dskd_env, run_dskd, tree_digest, write_config
from dskd.errors import DskdError
from dskd.training import checkpoint, run_lock

# 128 examples / batch 16 = 8 steps per epoch, 16 steps; a checkpoint every 4 steps, all kept;
# ZeRO-2, so the optimizer has files of its own.
REF = {"data.train_limit": 128, "data.dev_limit": 32, "training.save_every": 4, "training.keep_checkpoints": 4,
       "training.deepspeed": "ds_configs/zero2_fp32.json"}
STEPS = ["step00000004", "step00000008", "step00000012", "step00000016"]


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def _status(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["status"]


@pytest.fixture(scope="module")
def reference(session_tmp):
    """An uninterrupted run every interrupted or damaged one must end equal to, bit for bit."""
    cfg = write_config(session_tmp / "ckpt-ref.yaml", REF)
    out = session_tmp / "ckpt-ref"
    _ok(run_dskd(["distill", "--config", cfg, "--output", out], session_tmp))
    assert sorted(checkpoint.complete_tags(out / "checkpoints")) == STEPS
    return cfg, out


def _killed_after_final_checkpoint(reference, dest: Path) -> Path:
    """The reference as a run killed after its last checkpoint, before `completed` (no export,
    no metrics): what a kill -9 in that window leaves."""
    shutil.copytree(reference[1], dest)
    shutil.rmtree(dest / "model")
    (dest / "metrics.json").unlink()
    info = json.loads((dest / "run.json").read_text())
    (dest / "run.json").write_text(json.dumps(dict(info, status="running")))
    return dest


# ------------------------------------------------------------------ manifest, unit level


def test_manifest_catches_each_kind_of_damage(tmp_path):
    folder = tmp_path / "step00000001"
    folder.mkdir()
    (folder / "a.pt").write_bytes(b"x" * 100)
    (folder / "rng_rank0.pt").write_bytes(b"y" * 10)
    checkpoint.write_manifest(folder, 1)
    assert checkpoint.verify(folder) is None
    (folder / "a.pt").write_bytes(b"x" * 99 + b"z")  # same size, one byte changed
    assert checkpoint.verify(folder, full=False) is None  # sizes only: by design blind to this
    assert "a.pt does not match its SHA-256" in checkpoint.verify(folder)
    (folder / "a.pt").write_bytes(b"x" * 50)
    assert checkpoint.verify(folder, full=False) == "a.pt has 50 bytes, the manifest says 100"
    (folder / "a.pt").write_bytes(b"x" * 100)
    (folder / "rng_rank0.pt").unlink()
    assert checkpoint.verify(folder) == "rng_rank0.pt is missing"
    (folder / "rng_rank0.pt").write_bytes(b"y" * 10)
    (folder / "stray.pt").write_bytes(b"")
    assert checkpoint.verify(folder) == "stray.pt is not in the manifest"
    (folder / "stray.pt").unlink()
    (folder / checkpoint.COMPLETE).write_text("{garbage")
    assert checkpoint.verify(folder) == "its COMPLETE manifest is not valid JSON"
    (folder / checkpoint.COMPLETE).write_text("ok\n")  # a checkpoint of dskd before manifests
    assert checkpoint.verify(folder) is None


def test_newest_verified_falls_back_and_says_why(tmp_path):
    for step in (1, 2, 3):
        folder = tmp_path / checkpoint.tag_for(step)
        folder.mkdir()
        (folder / "m.pt").write_bytes(bytes([step]) * 64)
        checkpoint.write_manifest(folder, step)
    (tmp_path / "step00000004.partial").mkdir()  # a save killed half way: never a candidate
    (tmp_path / "step00000003" / "m.pt").write_bytes(b"")
    (tmp_path / "step00000002" / "m.pt").unlink()
    tag, skipped = checkpoint.newest_verified(tmp_path)
    assert tag == "step00000001"
    assert skipped == ["checkpoint step00000003 skipped: m.pt has 0 bytes, the manifest says 64",
                       "checkpoint step00000002 skipped: m.pt is missing"]
    assert checkpoint.set_aside_newer(tmp_path, tag) == ["step00000002.damaged", "step00000003.damaged"]
    assert checkpoint.complete_tags(tmp_path) == ["step00000001"]


def test_checkpoint_size_estimate_matches_written_checkpoints(reference):
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(reference[1] / "model" / "model.safetensors")).values())
    folder = reference[1] / "checkpoints" / STEPS[-1]
    written = sum(p.stat().st_size for p in folder.iterdir() if p.name != checkpoint.COMPLETE)
    assert checkpoint.checkpoint_bytes(params, torch.float32, 2) == pytest.approx(written, rel=0.01)


def test_a_live_lock_is_refused_and_a_dead_one_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / run_lock.LOCK_FILE
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid, "slurm_job": None,
                                    "since": "then"}))
        with pytest.raises(DskdError, match=rf"being written by another dskd process \(pid {sleeper.pid} on .*"
                                            rf"delete {re.escape(str(lock))}"):
            run_lock.acquire(tmp_path)
        assert run_lock.live_holder(tmp_path)["pid"] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_lock.live_holder(tmp_path) is None
    run_lock.acquire(tmp_path)  # its process is gone: stale
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    run_lock.release()
    assert not lock.exists()


# ------------------------------------------------------------------ damaged checkpoints

def _flip(path: Path, offsets=(1000, 2000, 3000)) -> None:
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    # name: what is done to which checkpoints, the checkpoint the resume must continue from
    "optimizer bytes flipped, rng file deleted": (
        [("step00000016", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "flip"),
         ("step00000012", "rng_rank0.pt", "delete")], "step00000008"),
    "model file truncated, optimizer file empty": (
        [("step00000016", "mp_rank_00_model_states.pt", "truncate"),
         ("step00000012", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "empty")], "step00000008"),
    "rng file garbled, manifest garbled, latest garbled": (
        [("step00000016", "rng_rank0.pt", "flip"), ("step00000012", "COMPLETE", "garble"),
         (None, "latest", "garble")], "step00000008"),
    "nothing damaged": ([], "step00000016"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_an_older_one_and_ends_identical(reference, session_tmp, case):
    damage, expected = DAMAGE[case]
    run = _killed_after_final_checkpoint(reference, session_tmp / f"damaged-{case.replace(' ', '-')}")
    ckpt = run / "checkpoints"
    for tag, name, how in damage:
        path = ckpt / tag / name if tag else ckpt / name
        {"flip": _flip, "delete": Path.unlink, "truncate": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
         "empty": lambda p: p.write_bytes(b""), "garble": lambda p: p.write_bytes(b"\xff\xfe garbage")}[how](path)
    untouched = tree_digest(ckpt / expected)
    proc = _ok(run_dskd(["distill", "--config", reference[0], "--output", run, "--resume"], session_tmp))
    skipped = [line for line in proc.stderr.splitlines() if "skipped:" in line]
    assert len(skipped) == sum(1 for tag, _, _ in damage if tag), proc.stderr[-3000:]
    assert f"[resume] continuing from checkpoint {expected}" in proc.stderr
    assert_same_run(reference[1], run)
    assert _status(run) == "completed"
    if expected == STEPS[-1]:  # resumed at its last checkpoint: kept as it was, never rewritten
        assert tree_digest(ckpt / expected) == untouched
    else:
        assert sorted(p.name for p in ckpt.glob("*.damaged")) == sorted({f"{t}.damaged" for t, _, _ in damage if t})


@pytest.mark.slow
def test_no_checkpoint_left_to_trust_is_one_line_and_nothing_is_touched(reference, session_tmp):
    run = _killed_after_final_checkpoint(reference, session_tmp / "all-damaged")
    for tag in STEPS:
        (run / "checkpoints" / tag / "rng_rank0.pt").unlink()
    (session_tmp / "garbled-run").mkdir()
    shutil.copytree(reference[1], session_tmp / "garbled-run" / "r")
    (session_tmp / "garbled-run" / "r" / "run.json").write_bytes(b"\x89\x00{not json")
    for folder, message in ((run, r"--resume: no checkpoint in .* matches its manifest \(checkpoint step00000016 "
                                  r"skipped: rng_rank0.pt is missing;"),
                            (session_tmp / "garbled-run" / "r", r"run.json is damaged \(UnicodeDecodeError")):
        before = tree_digest(folder)
        proc = run_dskd(["distill", "--config", reference[0], "--output", folder, "--resume"], session_tmp)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("dskd: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert tree_digest(folder) == before
    exported = run_dskd(["export", "--run", run, "--out", session_tmp / "all-damaged-export"], session_tmp)
    assert exported.returncode == 2 and re.search(r"dskd: error: --run .*: checkpoint step00000016 does not match its "
                                                  r"manifest \(rng_rank0.pt is missing\)", exported.stderr)


# ------------------------------------------------------------------ kill -9


def _start(args, session_tmp, nproc=1):
    cmd = [sys.executable, "-m", "dskd", *map(str, args)] if nproc == 1 else \
        ["bash", str(REPO / "launchers" / "local.sh"), str(nproc), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env=dskd_env(session_tmp), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_when(proc, condition, timeout=240) -> bool:
    """SIGKILL the whole process group the moment ``condition()`` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the run neither reached the kill point nor ended")


@pytest.mark.slow
@pytest.mark.parametrize("nproc, point", [(1, "mid-checkpoint"), (1, "mid-epoch"), (2, "mid-checkpoint")])
def test_kill_9_then_auto_resume_ends_identical(reference, session_tmp, nproc, point, request):
    """kill -9 while a checkpoint is half written (its .partial folder exists), or between
    checkpoints, then --auto-resume as a requeued job would: bit-identical to the uninterrupted
    run (on two ranks: the two-rank ZeRO-2 reference of tests/test_e2e.py)."""
    if nproc == 1:
        expected, settings = reference[1], REF
    else:
        expected, settings = request.getfixturevalue("two_rank_reference"), {
            "training.deepspeed": "ds_configs/zero2_fp32.json"}
    cfg = write_config(session_tmp / f"kill-{nproc}.yaml", {**settings, "training.save_every": 1,
                                                            "training.keep_checkpoints": 2})
    out = session_tmp / f"kill-{nproc}-{point}"
    ckpt = out / "checkpoints"

    def mid_checkpoint():
        return ckpt.is_dir() and any(p.name.endswith(checkpoint.PARTIAL) for p in ckpt.iterdir()) \
            and len(checkpoint.complete_tags(ckpt)) >= 1

    def mid_epoch():
        return "step00000005" in checkpoint.complete_tags(ckpt)

    proc = _start(["distill", "--config", cfg, "--output", out], session_tmp, nproc)
    assert _kill_when(proc, mid_checkpoint if point == "mid-checkpoint" else mid_epoch), "the run ended first"
    assert _status(out) == "running" and (out / run_lock.LOCK_FILE).exists()  # what kill -9 leaves
    resumed = _start(["distill", "--config", cfg, "--output", out, "--auto-resume"], session_tmp, nproc)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-4000:]
    assert "[resume] continuing from checkpoint" in err
    assert_same_run(expected, out)
    assert not (out / run_lock.LOCK_FILE).exists()
    assert not any(p.name.endswith(checkpoint.PARTIAL) for p in ckpt.iterdir())


# ------------------------------------------------------------------ signals and statuses


@pytest.mark.slow
def test_a_signal_during_start_up_is_a_clean_preemption(reference, session_tmp):
    out = session_tmp / "startup-signal"
    proc = _start(["distill", "--config", reference[0], "--output", out], session_tmp)
    deadline = time.monotonic() + 240
    while not (out / "run.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGTERM)  # the run folder is written; the engine and teacher are still loading
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 85, err[-3000:]
    assert "stopped before training (step 0), no new checkpoint; exiting with code 85" in err
    assert _status(out) == "preempted" and not checkpoint.complete_tags(out / "checkpoints")
    _ok(run_dskd(["distill", "--config", reference[0], "--output", out, "--auto-resume"], session_tmp))
    assert_same_run(reference[1], out)


@pytest.mark.slow
def test_a_signal_after_the_last_step_lets_the_run_finish(reference, session_tmp):
    out = session_tmp / "late-signal"
    proc = _start(["distill", "--config", reference[0], "--output", out], session_tmp)
    deadline = time.monotonic() + 240
    while STEPS[-1] not in checkpoint.complete_tags(out / "checkpoints") and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before the signal could be sent"
    os.killpg(proc.pid, signal.SIGTERM)  # the final checkpoint is written; export and metrics are not yet
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert _status(out) == "completed"
    assert_same_run(reference[1], out)


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(reference, session_tmp):
    run = session_tmp / "overwritten"
    shutil.copytree(reference[1], run)
    before = tree_digest(run)
    # Fails at its first step (a loss of inf), after the run folder was written: the old run comes back.
    failing = run_dskd(["distill", "--config", reference[0], "--output", run, "--overwrite",
                        "--set", "training.lr=1e30"], session_tmp)
    assert failing.returncode == 2
    assert re.search(r"dskd: error: the loss is not finite at step \d+ \(term\(s\): hard_ce, soft_kd, total\); "
                     r"the run stops, and its newest checkpoint \(none yet\) is kept", failing.stderr)
    assert "the run it replaced is back" in failing.stderr
    assert tree_digest(run) == before
    # A new run that does fail after its first checkpoint is `failed`, with its error line.
    failing = run_dskd(["distill", "--config", reference[0], "--output", run, "--overwrite",
                        "--set", "training.lr=1e30", "--set", "training.save_every=1"], session_tmp)
    assert failing.returncode == 2
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["error"].startswith("the loss is not finite at step")
    tags = checkpoint.complete_tags(run / "checkpoints")
    assert not (run / ".replaced").exists() and tags
    # No checkpoint was written after the loss went bad: the newest one holds finite weights.
    weights = checkpoint.consolidated_state_dict(run / "checkpoints", tags[-1], 2)
    assert all(torch.isfinite(w).all() for w in weights.values())


# ------------------------------------------------------------------ bad input, table-driven

DS_JSON = {
    "misspelled DeepSpeed key": ('{"zero_optimisation": {"stage": 2}}', r"unknown DeepSpeed key `zero_optimisation`; "
                                                                          r"did you mean `zero_optimization`"),
    "ZeRO stage 7": ('{"zero_optimization": {"stage": 7}}', r"`zero_optimization.stage`: Input should be 0, 1, 2, 3"),
    "ZeRO section a string": ('{"zero_optimization": "two"}', r"`zero_optimization` must be a JSON object"),
    "ZeRO stage a string": ('{"zero_optimization": {"stage": "two"}}', r"`zero_optimization.stage`: Input should be"),
    "fp16 a boolean": ('{"fp16": true}', r"`fp16` must be a JSON object"),
    "misspelled ZeRO key": ('{"zero_optimization": {"stage": 2, "overlap_com": true}}',
                            r"unknown DeepSpeed key `zero_optimization.overlap_com`; did you mean `overlap_comm`"),
    "duplicate JSON key": ('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 2}}',
                           r"key `zero_optimization` is given twice"),
    "bf16 enabled a string": ('{"bf16": {"enabled": "yes"}}', r"`bf16.enabled` must be true or false, got 'yes'"),
}
SETS = {
    "lr infinite": ("training.lr=.inf", r"`training.lr` must be a finite number, got inf"),
    "lr NaN": ("training.lr=.nan", r"`training.lr` must be a finite number, got nan"),
    "loss weight NaN": ("losses.soft_kd.weight=.nan", r"`losses.soft_kd.weight` must be a finite non-negative number"),
    "temperature NaN": ("losses.soft_kd.temperature=.nan", r"`losses.soft_kd.temperature` must be a finite number"),
    "negative clipping": ("training.max_grad_norm=-1", r"`training.max_grad_norm` must be 0 or more \(0 turns"),
    "negative save_every": ("training.save_every=-1", r"`training.save_every` must be 0 or more"),
    "negative eval_every": ("training.eval_every=-5", r"`training.eval_every` must be 0 or more"),
    "negative weight decay": ("training.weight_decay=-1", r"`training.weight_decay` must be 0 or more"),
    "log_every 0": ("training.log_every=0", r"`training.log_every` must be at least 1"),
    "negative seed": ("seed=-1", r"`seed` must be in \[0, "),
    "dropout above 1": ("teacher.arch.dropout=1.5", r"`teacher.arch.dropout` is a probability; it must be in \[0, 1\)"),
    "max_length beyond positions": ("data.max_length=2000", r"`data.max_length` is 2000, but the teacher has 512"),
    "unparsable --set value": ("training.lr=[", r"--set 'training.lr=\[': the value is not valid YAML"),
}

# Config mistakes caught before the run folder is touched (config overrides, extra arguments).
CONFIG_CASES = {
    "misspelled key": ({"training.lr_rate": 0.1}, [], r"unknown key `training.lr_rate`; did you mean `training.lr`"),
    "wrong type": ({"training.batch_size": "many"}, [], r"`training.batch_size` must be an integer, got 'many'"),
    "missing teacher": ({"teacher.path": "/no/teacher"}, [],
                        r"`teacher.path` points to /no/teacher, which does not exist"),
    "missing data": ({"data.path": "/no/glue"}, [], r"`data.path` points to /no/glue, which does not exist"),
    "unknown task": ({"data.task": "sst"}, [], r"data.task.*sst2"),
    "layer out of range": ({"student.layers": None, "student.teacher_layers": [1, 3]}, [],
                           r"`student.teacher_layers\[1\]` is 3, out of range: the teacher has 2 layers"),
    "student too deep": ({"student.layers": 3}, [], r"`student.layers` is 3, .* 1 to 2 layers"),
    "fp16 on cpu": ({}, ["--deepspeed", "ds_configs/zero2_fp16.json"], r"zero2_fp16.json enables fp16"),
    "heads cannot be grouped": (
        {"student.init_from_teacher": False, "student.layers": None, "losses.attention_kl": {"weight": 1.0},
         "student.arch": {"layers": 1, "hidden": 24, "heads": 3, "intermediate": 48}}, [],
        r"`losses.attention_kl`: the student has 3 attention heads and the teacher 2.*Set `heads: mean`"),
    "layer map out of range": ({"losses.cls_cosine": {"weight": 1.0}, "layer_map": [3]}, [],
                               r"`layer_map\[0\]` is 3, out of range: the teacher has 2 layers"),
    "stage layer not mapped": (
        {"losses.cls_cosine": {"weight": 1.0}, "schedule": [{"name": "a", "epochs": 1, "layers": [2]}]}, [],
        r"`schedule\[0\].layers\[0\]` \(a\) is student layer 2, which is not mapped"),
}


def _bad_cases(tmp: Path, cfg: Path, previous: Path) -> dict:
    """name -> (argv, the message's pattern); every one is run with --overwrite on `previous`
    unless it names its own output."""
    cases = {}
    for name, (body, message) in DS_JSON.items():
        path = tmp / f"{name.replace(' ', '-')}.json"
        path.write_text(body)
        cases[name] = (["--deepspeed", str(path)], message)
    for name, (assignment, message) in SETS.items():
        cases[name] = (["--set", assignment], message)
    for name, (overrides, extra, message) in CONFIG_CASES.items():
        if name == "fp16 on cpu" and torch.ops.mkldnn._is_mkldnn_fp16_supported():
            continue  # this CPU trains fp16
        path = write_config(tmp / f"{name.replace(' ', '-')}.yaml", {**REF, **overrides})
        cases[name] = (["--config", str(path), *extra], message)
    latin = tmp / "latin1.yaml"
    latin.write_bytes(cfg.read_bytes() + "# résumé\n".encode("latin-1"))
    twice = tmp / "twice.yaml"
    twice.write_text(cfg.read_text() + "seed: 3\nseed: 4\n")
    folder = tmp / "a-folder.yaml"
    folder.mkdir()
    a_file = tmp / "a-file"
    a_file.write_text("")
    no_run_json = tmp / "no-run-json"
    shutil.copytree(previous, no_run_json)
    (no_run_json / "run.json").unlink()
    cases.update({
        "config not UTF-8": (["--config", str(latin)], r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset"),
        "duplicate YAML key": (["--config", str(twice)], r"twice.yaml: line \d+: key `seed` is given twice"),
        "config is a folder": (["--config", str(folder)], r"--config .*a-folder.yaml is a folder; pass a YAML file"),
        "output under a file": (["--output", str(a_file / "run")], r"a-file is a file, so no folder can be made"),
        "resume without run.json": (["--output", str(no_run_json), "--resume"],
                                    r"has checkpoints but no run.json"),
    })
    return cases


@pytest.mark.slow
def test_bad_input_is_one_line_and_the_previous_run_is_untouched(reference, session_tmp, tmp_path):
    previous = session_tmp / "bad-input-previous"
    shutil.copytree(reference[1], previous)
    cases = _bad_cases(tmp_path, reference[0], previous)
    assert len(cases) >= 36
    batch = []
    for name, (extra, _) in cases.items():
        argv = ["distill", "--config", str(reference[0]), "--output", str(previous), "--overwrite"]
        for flag in ("--config", "--output"):
            if flag in extra:
                argv[argv.index(flag) + 1] = extra[extra.index(flag) + 1]
        if "--resume" in extra:
            argv.remove("--overwrite")
        argv += [a for i, a in enumerate(extra) if a not in ("--config", "--output") and
                 (i == 0 or extra[i - 1] not in ("--config", "--output"))]
        batch.append([name, argv])
    before = tree_digest(previous)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py")], cwd=REPO, env=dskd_env(session_tmp),
                          input=json.dumps({"cases": batch, "watch": str(previous)}), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = []
    for name, (_, message) in cases.items():
        result = results[name]
        errors = [line for line in result["stderr"].splitlines() if line.startswith("dskd: error:")]
        if result["code"] != 2 or len(errors) != 1 or not re.search(message, errors[0]) \
                or result["digest"] != before:
            failures.append(f"{name}: exit {result['code']}, {errors or result['stderr'][-500:]}"
                            + ("" if result["digest"] == before else " (the previous run was changed)"))
    assert not failures, "\n".join(failures)


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs and a read-only bind mount (needs root and mount rights, as CI has)."""
    small, src, ro = tmp_path / "small", tmp_path / "src", tmp_path / "ro"
    for folder in (small, src, ro):
        folder.mkdir()
    mounted = []
    for cmd in (["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(small)], ["mount", "--bind", str(src), str(ro)],
                ["mount", "-o", "remount,bind,ro", str(ro)]):
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            for path in reversed(mounted):
                subprocess.run(["umount", path])
            pytest.skip(f"cannot mount here ({' '.join(cmd[:3])}): needs root with mount rights")
        mounted.append(cmd[-1])
    yield small, ro
    for path in (str(small), str(ro)):
        subprocess.run(["umount", path])


@pytest.mark.slow
def test_a_full_or_read_only_disk_is_one_line(reference, session_tmp, small_disk):
    small, ro = small_disk

    def refused(args):
        proc = run_dskd(["distill", "--config", reference[0], *args], session_tmp)
        errors = [line for line in proc.stderr.splitlines() if "dskd: error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.stderr, errors[0]

    _, error = refused(["--output", ro / "run"])
    assert re.search(r"cannot write in .*ro: Read-only file system \(EROFS\)", error)
    # One checkpoint (~16 MB) does not fit beside 20 MB of ballast: refused before training.
    (small / "ballast").write_bytes(b"\0" * (20 * 2**20))
    _, error = refused(["--output", small / "tight"])
    assert re.search(r"tight: \d+\.\d MB free, but one checkpoint of this run takes about 1\d\.\d MB", error)
    assert not (small / "tight" / "checkpoints").exists() or not any((small / "tight" / "checkpoints").iterdir())
    # Room for one checkpoint, not two: warned, then the disk fills at the second (step 8).
    (small / "ballast").unlink()
    stderr, error = refused(["--output", small / "run"])
    assert "[disk]" in stderr and "so it may fail when the disk fills" in stderr
    assert re.search(r"cannot write .*checkpoints/step00000008: No space left on device \(ENOSPC\)", error)
    info = json.loads((small / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "ENOSPC" in info["error"]
    assert checkpoint.complete_tags(small / "run" / "checkpoints") == ["step00000004"]
