"""The run folder: what it holds, checking it before anything is written, and writing its
bookkeeping (``config.yaml``, ``run.json``) once every input check has passed.

Run statuses in ``run.json``: ``running``, ``completed``, ``halted`` (halt_after_steps),
``preempted`` (a scheduler signal; exit 85), ``failed`` (with the error line in ``error``).
A run killed outright (kill -9, a node failure) stays ``running``; its lock is then stale."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from dskd.config import ExperimentConfig, build_dataclass, dump_config, to_dict
from dskd.errors import DskdError
from dskd.methods import run_outputs
from dskd.runtime import dist
from dskd.training import checkpoint, run_lock

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "dev_predictions.jsonl"  # the final model's prediction for every dev example
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_DIR = "model_config"  # the trained model's HF config + tokenizer, for export
STAGE_BEST_DIR = "stage_best"  # checkpoint of the best dev evaluation of a `keep_best` stage
# Keys that may differ between a run and its resumption.
RESUME_MUTABLE_KEYS = {(section, key) for section in ("training", "finetune")
                       for key in ("halt_after_steps", "checkpoint_check", "progress", "log_every_seconds")} \
    | {("teacher", "random_ok")}  # a permission, not a setting: a run started before the key resumes with it


REPLACED_DIR = ".replaced"  # the run --overwrite replaces, kept until the new run's first checkpoint
_replacing: list[Path] = []  # run folders whose old run sits in REPLACED_DIR, put back on failure
_written: list[Path] = []  # run folders whose run.json this process set to `running`


def read_run_info(out: Path, flag: str = "--resume") -> dict:
    path = out / RUN_FILE
    if not path.is_file():
        raise DskdError(f"{flag}: {out} has checkpoints but no {RUN_FILE}, so it is not a run dskd can continue; "
                        "start it again with --overwrite, or choose another folder")
    try:
        info = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DskdError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:80]}); restore it from a copy, or "
                        "start again with --overwrite") from None
    if not isinstance(info, dict):
        raise DskdError(f"{path} is damaged (not a JSON object); restore it from a copy, or start again with "
                        "--overwrite")
    return info


def saved_config(out: Path) -> dict:
    """The config a run was started with, completed with today's defaults for keys added to
    the schema since (so a run started by an older dskd resumes when nothing really changed)."""
    path = out / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DskdError(f"{path} is damaged ({type(exc).__name__}); restore it from a copy, or start again with "
                        "--overwrite") from None
    if raw is not None and not isinstance(raw, dict):
        raise DskdError(f"{path} is damaged (not a mapping of sections); restore it from a copy, or start again "
                        "with --overwrite")
    try:
        return to_dict(build_dataclass(ExperimentConfig, raw or {}, str(path)))
    except DskdError:  # a key this version no longer knows: compare as written
        return raw if isinstance(raw, dict) else {}


def _diff_configs(old: dict, new: dict, prefix: tuple = ()) -> list[str]:
    keys = set(old) | set(new)
    diffs = []
    for key in sorted(keys, key=str):
        path = prefix + (key,)
        a, b = old.get(key), new.get(key)
        if path in RESUME_MUTABLE_KEYS:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _diff_configs(a, b, path)
        elif a != b:
            diffs.append(f"{'.'.join(map(str, path))}: {a!r} -> {b!r}")
    return diffs


def _as_global_batch(saved: dict, new: dict, world: int | None) -> dict:
    """``saved`` with ``global_batch_size`` taken as given when ``new`` states the global batch the
    run already had (``world x batch_size x grad_accum``): so a run started without it can be
    resumed with it, on another number of ranks (``dskd.training.rescale``)."""
    saved = {**saved}
    for section in ("training", "finetune"):
        old, now = saved.get(section) or {}, new.get(section) or {}
        if old.get("global_batch_size") is None and now.get("global_batch_size") is not None and world \
                and old.get("batch_size") == now.get("batch_size") \
                and world * old["batch_size"] * old.get("grad_accum", 1) == now["global_batch_size"]:
            saved[section] = dict(old, global_batch_size=now["global_batch_size"], grad_accum=now.get("grad_accum"))
    return saved


def check_writable(out: Path) -> None:
    """The output path can be created and written: no file on the way, the nearest existing
    folder accepts a new file (read-only mounts, permissions, a full disk)."""
    if out.exists() and not out.is_dir():
        raise DskdError(f"--output {out} is a file; give a folder")
    folder = out
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DskdError(f"--output {out}: {folder} is a file, so no folder can be made under it; give another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DskdError(f"--output {out}: cannot write in {folder}: {exc.strerror} "
                        f"({errno.errorcode.get(exc.errno, exc.errno)}); choose a writable folder") from None


def check_output_dir(out: Path, resume: bool, overwrite: bool, cfg: ExperimentConfig, auto: bool = False,
                     check: str = "full") -> str | None:
    """Validate the output folder without writing (but for its lock); return the checkpoint
    tag to resume from: the newest that matches its manifest (``check``: full | sizes).

    ``auto`` (``--auto-resume``, what a requeued job runs): resume when the folder holds a
    complete checkpoint of this config, start fresh when it holds none, refuse another config.
    """
    if sum((resume, overwrite, auto)) > 1:
        raise DskdError("--resume, --auto-resume and --overwrite contradict each other; pick one")
    check_writable(out)
    run_lock.acquire(out)
    holds_run = (out / RUN_FILE).exists() or (out / "checkpoints").exists()
    ckpt_dir = out / "checkpoints"
    if auto:
        if checkpoint.complete_tags(ckpt_dir):
            resume = True
        elif holds_run:
            diffs = _diff_configs(saved_config(out), to_dict(cfg))
            if diffs:
                raise DskdError(f"--auto-resume: {out} holds a run of another config ({'; '.join(diffs)}); "
                                "choose another folder")
            return None  # stopped before its first checkpoint: start over
    if not resume:
        if holds_run and not overwrite:
            raise DskdError(
                f"--output {out} already holds a run; continue it with --resume, "
                "replace it with --overwrite, or choose another folder"
            )
        return None
    if not checkpoint.complete_tags(ckpt_dir):
        raise DskdError(f"--resume: {ckpt_dir} holds no complete checkpoint to resume from")
    run = read_run_info(out)
    diffs = _diff_configs(_as_global_batch(saved_config(out), to_dict(cfg), run.get("world_size")), to_dict(cfg))
    if diffs:
        raise DskdError(
            f"--resume: the config differs from the one {out} was started with ({'; '.join(diffs)}); "
            "resume with the same config, or start a new run"
        )
    tag, skipped = checkpoint.newest_verified(ckpt_dir, check == "full")
    if dist.rank() == 0:
        for line in skipped:
            print(f"[resume] {line}", file=sys.stderr, flush=True)
    if tag is None:
        raise DskdError(f"--resume: no checkpoint in {ckpt_dir} matches its manifest ({'; '.join(skipped)}); "
                        "the run cannot be continued, start it again with --overwrite")
    return tag


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def init_output_dir(job, argv: list[str]) -> None:
    """Move a replaced run aside (``--overwrite``), then write the config, the model's config
    and tokenizer (for export) and ``run.json`` with status ``running``."""
    out = job.out
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        run_lock.acquire(out)
        if job.resume_tag is None:
            _move_aside(out)
        else:
            for name in checkpoint.set_aside_newer(out / "checkpoints", job.resume_tag):
                print(f"[resume] {name}: set aside (it failed its manifest); delete it when you have looked at it",
                      file=sys.stderr, flush=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        dump_config(job.cfg, out / CONFIG_FILE)
        job.model.config.save_pretrained(out / MODEL_CONFIG_DIR)
        job.tokenizer.save_pretrained(out / MODEL_CONFIG_DIR)
        info = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else {}
        info.pop("error", None)
        info.update(
            role=job.role,
            status="running",
            command=argv,
            world_size=dist.world_size(),
            zero_stage=job.zero_stage,
            deepspeed_config=str(job.ds_file),
            dtype=str(job.dtype).replace("torch.", ""),
            task=job.task.name,
            model_class=job.task.model_class,  # what `dskd export` builds (a corpus job's depends on its terms)
            student_teacher_layers=job.student_layers,
            teacher_cache=str(job.teacher.path) if job.cached else None,
        )
        write_json(out / RUN_FILE, info)
        _written.append(out)
    dist.barrier()


def _run_entries(out: Path) -> list[Path]:
    names = (RUN_FILE, METRICS_FILE, CONFIG_FILE, "checkpoints", "tensorboard", "model", MODEL_CONFIG_DIR,
             STAGE_BEST_DIR, *run_outputs())
    return [out / name for name in names if (out / name).exists()]


def _move_aside(out: Path) -> None:
    """A run being replaced goes to ``.replaced`` (a rename, so instant and reversible); it is
    deleted once the new run has a checkpoint (``discard_replaced``), put back if the new run
    fails before that (``fail``). A ``.replaced`` already there holds the run first replaced;
    what is beside it then is a replacement that never reached a checkpoint."""
    entries = _run_entries(out)
    aside = out / REPLACED_DIR
    if aside.is_dir():
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    elif entries:
        aside.mkdir()
        for entry in entries:
            os.replace(entry, aside / entry.name)
    if aside.is_dir():
        _replacing.append(out)
        print(f"[run] the run replaced by --overwrite is kept in {aside} until this run writes its first checkpoint",
              file=sys.stderr, flush=True)


def discard_replaced(out: Path) -> None:
    """The new run has a complete checkpoint: the run it replaced can go (rank 0)."""
    if dist.rank() == 0 and (out / REPLACED_DIR).is_dir():
        shutil.rmtree(out / REPLACED_DIR)
    if out in _replacing:
        _replacing.remove(out)


def fail(error: str) -> None:
    """This process is ending on an error: put a replaced run back (the new one never reached a
    checkpoint) or mark the run `failed` with the error line. Never raises."""
    if dist.rank() != 0:
        return
    for out in list(_replacing):
        try:
            for entry in _run_entries(out):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            for entry in (out / REPLACED_DIR).iterdir():
                os.replace(entry, out / entry.name)
            (out / REPLACED_DIR).rmdir()
            if out in _written:
                _written.remove(out)
            print(f"[run] the new run failed before its first checkpoint; the run it replaced is back in {out}",
                  file=sys.stderr, flush=True)
        except OSError as exc:
            print(f"[run] could not put the replaced run back from {out / REPLACED_DIR}: {exc}", file=sys.stderr)
        _replacing.remove(out)
    for out in _written:
        try:
            set_status(out, "failed", error=error)
        except (OSError, ValueError):
            pass


def forget() -> None:
    """This command is over: the next one in the same process (tests) starts with a clean slate."""
    _replacing.clear()
    _written.clear()


def set_status(out: Path, status: str, **extra) -> None:
    if dist.rank() == 0:
        info = json.loads((out / RUN_FILE).read_text())
        info["status"] = status
        info.update(extra)
        write_json(out / RUN_FILE, info)
