"""The training loop, shared by ``dskd finetune`` (teacher, hard labels) and ``dskd distill``.

Order of work matters for users: everything that can fail on bad input (config, paths,
data files, model shapes, DeepSpeed JSON, the output folder's state) is checked before
the output folder is written, so a mistake never costs a previous run's results.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from dskd import checkpoint, data, engine as eng, metrics as metrics_mod, models
from dskd.config import ExperimentConfig, TrainingConfig, dump_config, to_dict
from dskd.errors import DskdError
from dskd.losses import build_loss_terms
from dskd.monitor import Monitor

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_DIR = "model_config"  # the trained model's HF config + tokenizer, for export
# Keys that may differ between a run and its resumption.
RESUME_MUTABLE_KEYS = {("training", "halt_after_steps"), ("finetune", "halt_after_steps")}


class DistillationModule(nn.Module):
    """What DeepSpeed wraps: the trained model plus every loss term.

    Loss terms with parameters (projections) thereby land in the optimizer, in ZeRO
    partitioning and in checkpoints. Losses are computed inside ``forward`` so that
    ZeRO-3 gathers those parameters like any other.
    """

    def __init__(self, model: nn.Module, terms: nn.ModuleDict, needs: frozenset[str]):
        super().__init__()
        self.model = model
        self.terms = terms
        self.needs = needs

    def forward(self, batch: dict, teacher: dict | None = None, weights: dict[str, float] | None = None):
        out = self.model(
            **models.model_inputs(batch),
            output_hidden_states="hidden_states" in self.needs,
            output_attentions="attentions" in self.needs,
        )
        student = {name: out[name] for name in self.needs | {"logits"} if out.get(name) is not None}
        if weights is None:
            return student
        targets = dict(teacher or {}, labels=batch["labels"])
        values = {name: self.terms[name](student, targets, batch["attention_mask"]) for name in weights}
        total = sum(weight * values[name] for name, weight in weights.items())
        return total, values


@dataclass
class Stage:
    name: str
    start: int  # first optimizer step (0-based) of the stage
    end: int  # one past its last step
    weights: dict[str, float]


def plan_stages(specs: list, losses: dict[str, dict], training: TrainingConfig, steps_per_epoch: int):
    """Turn the schedule into step ranges. No schedule: one stage of every term."""
    default_weights = {name: float(spec["weight"]) for name, spec in losses.items()}
    if not specs:
        total = max(1, math.ceil(training.epochs * steps_per_epoch))
        return [Stage("train", 0, total, {k: w for k, w in default_weights.items() if w > 0})]
    stages, start = [], 0
    for spec in specs:
        length = spec.steps if spec.steps is not None else max(1, math.ceil(spec.epochs * steps_per_epoch))
        weights = dict(spec.losses) if spec.losses else default_weights
        stages.append(Stage(spec.name, start, start + length, {k: w for k, w in weights.items() if w > 0}))
        start += length
    return stages


def epoch_batches(n: int, epoch: int, seed: int, rank: int, world: int, batch_size: int, grad_accum: int):
    """This rank's micro-batches for one epoch: a seeded permutation, equal work on every rank."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    mine = order[rank::world][: n // world]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]
    return batches[: len(batches) // grad_accum * grad_accum]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def check_output_dir(out: Path, resume: bool, overwrite: bool, cfg: ExperimentConfig) -> str | None:
    """Validate the output folder without writing; return the checkpoint tag to resume from."""
    if resume and overwrite:
        raise DskdError("--resume and --overwrite contradict each other; pick one")
    holds_run = (out / RUN_FILE).exists() or (out / "checkpoints").exists()
    if out.exists() and not out.is_dir():
        raise DskdError(f"--output {out} is a file; give a folder")
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
    saved = yaml.safe_load((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else {}
    diffs = _diff_configs(saved, to_dict(cfg))
    if diffs:
        raise DskdError(
            f"--resume: the config differs from the one {out} was started with ({'; '.join(diffs)}); "
            "resume with the same config, or start a new run"
        )
    run = json.loads((out / RUN_FILE).read_text())
    if run.get("world_size") != eng.world_size():
        raise DskdError(
            f"--resume: {out} was trained on {run.get('world_size')} ranks, this job has {eng.world_size()}; "
            "resume with the same number of ranks (ZeRO partitions and the data order depend on it)"
        )
    return tag


@dataclass
class Job:
    """Everything prepared (and validated) before the output folder is touched."""

    cfg: ExperimentConfig
    role: str  # "distill" or "finetune"
    out: Path
    training: TrainingConfig
    losses: dict[str, dict]
    ds_config: dict
    ds_file: Path
    task: data.TaskSpec
    tokenizer: object
    train_set: object
    dev_set: object
    model: nn.Module
    teacher: nn.Module | None
    student_layers: list[int]
    resume_tag: str | None
    extra_run_info: dict = field(default_factory=dict)


def prepare(cfg: ExperimentConfig, role: str, out: Path, deepspeed_path: str | None, resume: bool, overwrite: bool) -> Job:
    eng.init_distributed()
    training = cfg.finetune if role == "finetune" else cfg.training
    losses = {"hard_ce": {"weight": 1.0}} if role == "finetune" else cfg.losses
    ds_config, ds_file = eng.load_ds_config(deepspeed_path or training.deepspeed, training)
    eng.check_precision_supported(ds_config, ds_file)
    resume_tag = check_output_dir(out, resume, overwrite, cfg)

    task = data.get_task(cfg.data.task)
    tokenizer = models.load_tokenizer(cfg.teacher)
    train_set, dev_set = load_data(cfg, task, tokenizer)

    dtype = eng.run_dtype(ds_config)
    device = eng.device()
    if cfg.teacher.path is not None:
        teacher = models.load_pretrained(cfg.teacher.path, task.num_labels, for_finetune=role == "finetune")
    else:
        teacher = models.build_from_arch(
            cfg.teacher.arch, len(tokenizer), task.num_labels, tokenizer.pad_token_id, cfg.seed, "teacher.arch"
        )
    if role == "finetune":
        return Job(cfg, role, out, training, losses, ds_config, ds_file, task, tokenizer, train_set, dev_set,
                   teacher, None, [], resume_tag)
    student, layers = models.build_student(cfg.student, teacher, task.num_labels, tokenizer.pad_token_id, cfg.seed)
    teacher = models.freeze(teacher, dtype, device)
    return Job(cfg, role, out, training, losses, ds_config, ds_file, task, tokenizer, train_set, dev_set,
               student, teacher, layers, resume_tag)


def load_data(cfg: ExperimentConfig, task, tokenizer):
    """Rank 0 tokenises first so the other ranks read the ``datasets`` cache it wrote."""
    splits = {}
    for order in (0, 1):
        if (eng.rank() == 0) == (order == 0):
            for split, limit in (("train", cfg.data.train_limit), ("dev", cfg.data.dev_limit)):
                raw = data.load_split(task, cfg.data.path, split, limit)
                splits[split] = data.tokenize_split(raw, tokenizer, cfg.data.max_length)
        eng.barrier()
    return splits["train"], splits["dev"]


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _init_output_dir(job: Job, argv: list[str]) -> None:
    out = job.out
    if eng.rank() == 0:
        if job.resume_tag is None:
            for name in (RUN_FILE, METRICS_FILE, CONFIG_FILE, "checkpoints", "tensorboard", "model", MODEL_CONFIG_DIR):
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
            world_size=eng.world_size(),
            zero_stage=eng.zero_stage(job.ds_config),
            deepspeed_config=str(job.ds_file),
            dtype=str(eng.run_dtype(job.ds_config)).replace("torch.", ""),
            task=job.task.name,
            student_teacher_layers=job.student_layers,
        )
        _write_json(out / RUN_FILE, info)
    eng.barrier()


def _set_status(out: Path, status: str) -> None:
    if eng.rank() == 0:
        info = json.loads((out / RUN_FILE).read_text())
        info["status"] = status
        _write_json(out / RUN_FILE, info)


def _eval_loader(dataset, pad_id: int, batch_size: int):
    shard = list(range(eng.rank(), len(dataset), eng.world_size()))
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    return _loader(dataset, batches, pad_id)


def _loader(dataset, batches: list[list[int]], pad_id: int):
    # Each DataLoader iterator draws a seed from the generator it is given, by default
    # the global torch RNG that dropout uses. A private generator keeps that stream
    # independent of where loaders are created, which an exact resume relies on.
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=lambda rows: data.collate(rows, pad_id),
        generator=torch.Generator(),
    )


def evaluate(forward, dataset, task, pad_id: int, batch_size: int, device) -> dict[str, float]:
    """Every rank scores its shard; all ranks get the same metrics over the whole dev set."""
    idx, logits, labels = [], [], []
    with torch.no_grad():
        for batch in _eval_loader(dataset, pad_id, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits.append(forward(batch).float().cpu())
            idx.append(batch["idx"].cpu())
            labels.append(batch["labels"].cpu())
    local = (
        torch.cat(idx) if idx else torch.empty(0, dtype=torch.long),
        torch.cat(logits) if logits else torch.empty(0, task.num_labels),
        torch.cat(labels) if labels else torch.empty(0),
    )
    parts = [local]
    if eng.world_size() > 1:
        parts = [None] * eng.world_size()
        torch.distributed.all_gather_object(parts, local)
    all_idx = torch.cat([p[0] for p in parts])
    order = torch.argsort(all_idx)
    all_logits = torch.cat([p[1] for p in parts])[order].numpy()
    all_labels = torch.cat([p[2] for p in parts])[order].numpy()
    return metrics_mod.compute_metrics(task, all_logits, all_labels)


def train_step(engine, teacher: nn.Module | None, batch: dict, weights: dict[str, float]):
    """One micro-step: frozen teacher forward (if a term in this stage uses it), student
    forward with the weighted loss terms, backward, and DeepSpeed's step (which applies
    the optimizer only at an accumulation boundary)."""
    module = engine.module
    teacher_out = None
    if teacher is not None and any(module.terms[name].uses_teacher for name in weights):
        teacher_out = models.teacher_outputs(teacher, batch, module.needs)
    total, values = engine(batch, teacher_out, weights)
    engine.backward(total)
    engine.step()
    return total, values


def _format_metrics(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def run(job: Job, argv: list[str]) -> dict:
    """Train; return the final metrics (with ``halted: true`` when stopped by halt_after_steps)."""
    cfg, training, task, out = job.cfg, job.training, job.task, job.out
    rank, world = eng.rank(), eng.world_size()
    device = eng.device()
    pad_id = job.tokenizer.pad_token_id

    batches_0 = epoch_batches(len(job.train_set), 0, cfg.seed, rank, world, training.batch_size, training.grad_accum)
    steps_per_epoch = len(batches_0) // training.grad_accum
    if steps_per_epoch == 0:
        raise DskdError(
            f"the training set has {len(job.train_set)} examples, fewer than one optimizer step needs "
            f"({world} ranks x training.batch_size {training.batch_size} x training.grad_accum "
            f"{training.grad_accum}); lower the batch size or use more data (data.train_limit)"
        )
    stages = plan_stages(cfg.schedule if job.role == "distill" else [], job.losses, training, steps_per_epoch)
    if job.resume_tag is not None and (out / METRICS_FILE).is_file():
        status = json.loads((out / RUN_FILE).read_text()).get("status")
        if status == "completed":
            if rank == 0:
                print(f"{out} already completed; nothing to resume", file=sys.stderr)
            return json.loads((out / METRICS_FILE).read_text())
    total_steps = stages[-1].end
    terms = build_loss_terms(job.losses)
    needs = frozenset().union(*(term.needs for term in terms.values()))

    _init_output_dir(job, argv)
    seed_everything(cfg.seed + rank)
    module = DistillationModule(job.model, terms, needs)
    engine = eng.initialize(module, job.ds_config, training, total_steps)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "teacher_metrics": None}
    if job.resume_tag is not None:
        state.update(checkpoint.load(engine, out / "checkpoints", job.resume_tag))

    eval_batch = training.batch_size * 2

    def student_logits(batch):
        return engine(batch)["logits"]

    if job.teacher is not None and state["teacher_metrics"] is None:
        state["teacher_metrics"] = evaluate(
            lambda b: models.teacher_outputs(job.teacher, b, frozenset({"logits"}))["logits"],
            job.dev_set, task, pad_id, eval_batch, device,
        )

    monitor = Monitor(out / "tensorboard", rank == 0, total_steps, state["step"], job.role)
    if state["teacher_metrics"] is not None:
        monitor.line(f"[teacher] dev {task.name}: {_format_metrics(state['teacher_metrics'])}")
        monitor.scalars({f"teacher/{k}": v for k, v in state["teacher_metrics"].items()}, 0)
    monitor.line(
        f"[{job.role}] {len(job.train_set)} train / {len(job.dev_set)} dev examples, {world} rank(s), "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, stages: "
        + ", ".join(f"{s.name}[{s.start}:{s.end}]({'+'.join(s.weights)})" for s in stages)
    )

    def stage_at(step: int) -> Stage:
        return next(s for s in stages if s.start <= step < s.end)

    def save() -> None:
        checkpoint.save(engine, out / "checkpoints", state["step"], {"dskd": dict(state)}, training.keep_checkpoints)

    sums: dict[str, torch.Tensor] = {}
    micro_count = 0
    window_start, window_steps = time.perf_counter(), 0
    samples_per_step = world * training.batch_size * training.grad_accum
    last_save_step = -1
    current_stage = stage_at(state["step"]).name if state["step"] < total_steps else None
    halted = False
    engine.train()

    while state["step"] < total_steps and not halted:
        batches = epoch_batches(len(job.train_set), state["epoch"], cfg.seed, rank, world,
                                training.batch_size, training.grad_accum)
        loader = _loader(job.train_set, batches[state["batch_in_epoch"] :], pad_id)
        for batch in loader:
            stage = stage_at(state["step"])
            if stage.name != current_stage:
                monitor.line(f"[stage] step {state['step']}: {current_stage} -> {stage.name}")
                current_stage = stage.name
            batch = {k: v.to(device) for k, v in batch.items()}
            total, values = train_step(engine, job.teacher, batch, stage.weights)
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            sums["total"] = sums.get("total", 0.0) + total.detach().float()
            micro_count += 1
            state["batch_in_epoch"] += 1
            if state["batch_in_epoch"] % training.grad_accum:
                continue

            state["step"] += 1
            window_steps += 1
            step = state["step"]
            end_of_epoch = state["batch_in_epoch"] == len(batches)
            if end_of_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            monitor.advance()

            if step % training.log_every == 0 or step == total_steps:
                names = sorted(sums)
                means = torch.stack([torch.as_tensor(sums[n]) for n in names]) / micro_count
                if world > 1:
                    torch.distributed.all_reduce(means)
                    means /= world
                elapsed = time.perf_counter() - window_start
                scalars = {f"train/loss/{n}": v for n, v in zip(names, means.tolist(), strict=True)}
                scalars["train/lr"] = engine.get_lr()[0]
                scalars["train/samples_per_s"] = window_steps * samples_per_step / max(elapsed, 1e-9)
                scalars["train/stage"] = float(stages.index(stage))
                monitor.scalars(scalars, step)
                sums, micro_count = {}, 0
                window_start, window_steps = time.perf_counter(), 0

            finished = step == total_steps
            halting = training.halt_after_steps is not None and step == training.halt_after_steps and not finished
            if (training.eval_every and step % training.eval_every == 0) or (
                not training.eval_every and end_of_epoch
            ) or finished:
                engine.eval()
                result = evaluate(student_logits, job.dev_set, task, pad_id, eval_batch, device)
                engine.train()
                main = result[task.main_metric]
                if state["best"] is None or main > state["best"][task.main_metric]:
                    state["best"] = dict(result, step=step)
                monitor.scalars({f"eval/{k}": v for k, v in result.items()}, step)
                monitor.line(
                    f"[eval] step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} "
                    f"{task.name}: {_format_metrics(result)} (best {task.main_metric}="
                    f"{state['best'][task.main_metric]:.4f} at step {state['best']['step']})"
                )
                state["last_eval"] = dict(result, step=step)
            if (training.save_every and step % training.save_every == 0) or (
                not training.save_every and end_of_epoch
            ) or finished or halting:
                save()
                last_save_step = step
            if finished:
                break
            if halting:
                halted = True
                break
    monitor.close()

    if halted:
        _set_status(out, "halted")
        if rank == 0:
            print(f"halted after step {state['step']} (training.halt_after_steps); continue with --resume",
                  file=sys.stderr)
        return {"halted": True, "step": state["step"]}

    if last_save_step != state["step"]:
        save()
    final = {k: v for k, v in state["last_eval"].items() if k != "step"}
    result = {"task": task.name, **final, "step": state["step"], "best": state["best"]}
    if state["teacher_metrics"] is not None:
        result["teacher"] = {"task": task.name, **state["teacher_metrics"]}
    if rank == 0:
        from dskd.export import export_run

        export_run(out, out / "model")
        _write_json(out / METRICS_FILE, result)
    _set_status(out, "completed")
    eng.barrier()
    return result
