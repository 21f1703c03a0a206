"""The run folder: what it holds, checking it before anything is written, and writing its
bookkeeping (``config.yaml``, ``run.json``) once every input check has passed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from dskd.config import ExperimentConfig, build_dataclass, dump_config, to_dict
from dskd.errors import DskdError
from dskd.methods import run_outputs
from dskd.runtime import dist
from dskd.training import checkpoint

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_DIR = "model_config"  # the trained model's HF config + tokenizer, for export
STAGE_BEST_DIR = "stage_best"  # checkpoint of the best dev evaluation of a `keep_best` stage
# Keys that may differ between a run and its resumption.
RESUME_MUTABLE_KEYS = {("training", "halt_after_steps"), ("finetune", "halt_after_steps")}


def saved_config(out: Path) -> dict:
    """The config a run was started with, completed with today's defaults for keys added to
    the schema since (so a run started by an older dskd resumes when nothing really changed)."""
    raw = yaml.safe_load((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else {}
    try:
        return to_dict(build_dataclass(ExperimentConfig, raw or {}, str(out / CONFIG_FILE)))
    except DskdError:  # a key this version no longer knows: compare as written
        return raw or {}


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


def check_output_dir(out: Path, resume: bool, overwrite: bool, cfg: ExperimentConfig, auto: bool = False) -> str | None:
    """Validate the output folder without writing; return the checkpoint tag to resume from.

    ``auto`` (``--auto-resume``, what a requeued job runs): resume when the folder holds a
    complete checkpoint of this config, start fresh when it holds none, refuse another config.
    """
    if sum((resume, overwrite, auto)) > 1:
        raise DskdError("--resume, --auto-resume and --overwrite contradict each other; pick one")
    holds_run = (out / RUN_FILE).exists() or (out / "checkpoints").exists()
    if out.exists() and not out.is_dir():
        raise DskdError(f"--output {out} is a file; give a folder")
    if auto:
        if checkpoint.latest_tag(out / "checkpoints") is not None:
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
    tag = checkpoint.latest_tag(out / "checkpoints")
    if tag is None:
        raise DskdError(f"--resume: {out / 'checkpoints'} holds no complete checkpoint to resume from")
    diffs = _diff_configs(saved_config(out), to_dict(cfg))
    if diffs:
        raise DskdError(
            f"--resume: the config differs from the one {out} was started with ({'; '.join(diffs)}); "
            "resume with the same config, or start a new run"
        )
    run = json.loads((out / RUN_FILE).read_text())
    if run.get("world_size") != dist.world_size():
        raise DskdError(
            f"--resume: {out} was trained on {run.get('world_size')} ranks, this job has {dist.world_size()}; "
            "resume with the same number of ranks (ZeRO partitions and the data order depend on it)"
        )
    return tag


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def init_output_dir(job, argv: list[str]) -> None:
    """Clear a replaced run (``--overwrite``), then write the config, the model's config and
    tokenizer (for export) and ``run.json`` with status ``running``."""
    out = job.out
    if dist.rank() == 0:
        if job.resume_tag is None:
            for name in (RUN_FILE, METRICS_FILE, CONFIG_FILE, "checkpoints", "tensorboard", "model", MODEL_CONFIG_DIR,
                         STAGE_BEST_DIR, *run_outputs()):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        dump_config(job.cfg, out / CONFIG_FILE)
        job.model.config.save_pretrained(out / MODEL_CONFIG_DIR)
        job.tokenizer.save_pretrained(out / MODEL_CONFIG_DIR)
        info = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else {}
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
    dist.barrier()


def set_status(out: Path, status: str) -> None:
    if dist.rank() == 0:
        info = json.loads((out / RUN_FILE).read_text())
        info["status"] = status
        write_json(out / RUN_FILE, info)
