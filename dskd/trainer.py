"""The training loop, shared by ``dskd finetune`` (teacher, hard labels) and ``dskd distill``.

Order of work matters for users: everything that can fail on bad input (config, paths,
data files, model shapes, DeepSpeed JSON, the output folder's state) is checked before
the output folder is written, so a mistake never costs a previous run's results.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from dskd import cache, checkpoint, data, engine as eng, glitter, metrics as metrics_mod, models, swa
from dskd.preemption import EXIT_PREEMPTED, StopRequest
from dskd.capture import QKCapture, forward_with_layers
from dskd.config import ExperimentConfig, PlateauConfig, TeacherConfig, TrainingConfig, dump_config, resolve_path, to_dict
from dskd.errors import DskdError
from dskd.losses import LOSS_REGISTRY, AttentionKL, LayerGeometry, LayerwiseTerm, build_loss_terms, term_type
from dskd.monitor import Monitor

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_DIR = "model_config"  # the trained model's HF config + tokenizer, for export
STAGE_BEST_DIR = "stage_best"  # checkpoint of the best dev evaluation of a `keep_best` stage
CAPTURED = {"attention_qk", "attention_v"}  # needs read by forward hooks (dskd.capture), not from outputs
TRAJECTORY_DIR = "trajectory"  # `trajectory: true`: the model exported at every checkpoint
# Keys that may differ between a run and its resumption.
RESUME_MUTABLE_KEYS = {("training", "halt_after_steps"), ("finetune", "halt_after_steps")}


class DistillationModule(nn.Module):
    """What DeepSpeed wraps: the trained model plus every loss term.

    Loss terms with parameters (projections) thereby land in the optimizer, in ZeRO
    partitioning and in checkpoints. Losses are computed inside ``forward`` so that
    ZeRO-3 gathers those parameters like any other.
    """

    def __init__(self, model: nn.Module, terms: nn.ModuleDict, needs: frozenset[str], capture: QKCapture | None = None):
        super().__init__()
        self.model = model
        self.terms = terms
        self.needs = needs
        self.capture = capture  # hooks on the model's mapped layers (a plain attribute, not a module)

    def set_progress(self, fraction: float) -> None:
        """Tell every term how much of the current stage is done (see ``LossTerm.progress``)."""
        for term in self.terms.values():
            term.progress = fraction

    def forward(self, batch: dict, teacher: dict | None = None, weights: dict[str, float] | None = None,
                pairs: tuple[tuple[int, int], ...] = (), split: str = "train"):
        """Without ``weights``: the student's outputs (for ``pairs``, its layer-wise ones too).
        With them: the weighted total and each term's value (layer-wise terms also per pair).
        ``split`` tells terms keyed by training index (CoDIR) where the batch comes from."""
        student = forward_with_layers(self.model, models.model_inputs(batch), self.needs, self.capture,
                                      [s for s, _ in pairs])
        student["pairs"] = pairs
        if weights is None:
            return student
        if "augment" in batch and glitter.reads_candidates(self.terms, weights):
            # Glitter: the student on the originals' augmented candidates (train mode, with grad), here
            # inside the DeepSpeed module so that ZeRO-3 gathers the parameters for it too.
            student["augment"] = {"logits": self.model(**models.model_inputs(batch["augment"]))["logits"]}
        targets = dict(teacher or {}, labels=batch["labels"], idx=batch.get("idx"), split=split)
        mask = batch["attention_mask"]
        values = {}
        for name in weights:
            term = self.terms[name]
            if isinstance(term, LayerwiseTerm) and term.per_pair:
                keep = [i for i, pair in enumerate(pairs) if term.compares(pair)]
                if not keep:  # none of this stage's layers is one the term compares
                    values[name] = mask.new_zeros((), dtype=torch.float32)
                    continue
                parts = term.pair_losses(_pick(student, keep), _pick(targets, keep), mask)
                values[name] = torch.stack(parts).sum()
                values.update({f"{name}/L{pairs[i][0]}": part for i, part in zip(keep, parts, strict=True)})
            else:
                values[name] = term(student, targets, mask)
                values.update({f"{name}/{key}": value for key, value in term.extra_logs().items()})
        total = sum(weight * values[name] for name, weight in weights.items())
        return total, values


def _pick(outputs: dict, keep: list[int]) -> dict:
    """``outputs`` with its per-pair lists (and ``pairs``) reduced to the positions ``keep``."""
    picked = dict(outputs)
    for key, value in outputs.items():
        if isinstance(value, (list, tuple)) and key in ("pairs", "cls", "mean", "hidden", "attention_qk",
                                                         "attention_v"):
            picked[key] = type(value)(value[i] for i in keep) if key == "pairs" else [value[i] for i in keep]
    return picked


@dataclass
class TeacherSide:
    """The frozen teacher and the hooks that read its mapped layers. ``cache.TeacherCache``
    has the same ``outputs`` interface and stands in for it in a cached run."""

    model: nn.Module
    capture: QKCapture | None = None
    source: str | None = None  # the schedule stage's `teacher`; None: `teacher.path` / `teacher.arch`

    def use(self, source: str | None, load) -> bool:
        """Distil from the teacher ``source`` from now on (``load(source)`` builds it, frozen);
        the previous one is released. Returns whether it changed."""
        if source == self.source:
            return False
        self.model = None  # let the old teacher go before the new one is loaded
        self.model = load(source)
        if self.capture is not None:
            layers = self.capture.layers
            self.capture.remove()
            self.capture = QKCapture(self.model, layers, "teacher")
        self.source = source
        return True

    def outputs(self, batch: dict, needs: frozenset[str], pairs: tuple[tuple[int, int], ...] = (),
                split: str = "train") -> dict:
        del split  # the online teacher computes; only the cache needs to know where to look
        return models.teacher_outputs(self.model, batch, needs, self.capture, [t for _, t in pairs])


@dataclass
class Stage:
    name: str
    start: int  # first optimizer step (0-based) of the stage
    end: int  # one past its last step (with a plateau rule: the latest it may end)
    weights: dict[str, float]
    layers: tuple[int, ...] | None = None  # student layers of the layer-wise terms; None = all mapped
    plateau: PlateauConfig | None = None
    keep_best: bool = False  # end the stage with its best-on-dev weights
    teacher: str | None = None  # the teacher of this stage (Pro-KD); None: the configured one

    def progress(self, step: int) -> float:
        """Share of the stage done before optimizer step ``step`` (0-based), in [0, 1)."""
        return min(max((step - self.start) / max(self.end - self.start, 1), 0.0), 1.0)


def plan_stages(specs: list, losses: dict[str, dict], training: TrainingConfig, steps_per_epoch: int,
                mapped_layers: list[int] = ()) -> list[Stage]:
    """Turn the schedule into step ranges. No schedule: one stage of every term.

    A ``per_layer`` stage becomes one stage per mapped student layer, bottom-up, which
    share its length: ``progressive`` (PID) turns on layer k alone, ``stacked`` (SID)
    layers 1..k.
    """
    default_weights = {name: float(spec["weight"]) for name, spec in losses.items()}
    if not specs:
        total = max(1, math.ceil(training.epochs * steps_per_epoch))
        return [Stage("train", 0, total, {k: w for k, w in default_weights.items() if w > 0})]
    stages, start = [], 0
    for spec in specs:
        length = spec.steps if spec.steps is not None else max(1, math.ceil(spec.epochs * steps_per_epoch))
        weights = dict(spec.losses) if spec.losses else default_weights
        weights = {k: w for k, w in weights.items() if w > 0}
        if spec.per_layer is None:
            expanded = [(spec.name, tuple(spec.layers) if spec.layers is not None else None)]
        else:
            ordered = sorted(mapped_layers)
            expanded = [
                (f"{spec.name}-L{layer}", (layer,) if spec.per_layer == "progressive" else tuple(ordered[: i + 1]))
                for i, layer in enumerate(ordered)
            ]
        # A per-layer stage's length is shared evenly by its layers (earlier ones take the
        # remainder), so one recipe gives students of any depth the same budget.
        shares = [length // len(expanded) + (i < length % len(expanded)) for i in range(len(expanded))]
        for (name, layers), share in zip(expanded, shares, strict=True):
            share = max(share, 1)
            stages.append(Stage(name, start, start + share, weights, layers, spec.plateau, spec.keep_best,
                                spec.teacher))
            start += share
    return stages


def shorten_stage(stages: list[Stage], index: int, end: int) -> None:
    """End stage ``index`` at step ``end`` (a plateau) and move every later stage earlier."""
    shift = stages[index].end - end
    stages[index].end = end
    for stage in stages[index + 1 :]:
        stage.start -= shift
        stage.end -= shift


def lr_factor(step: int, stages: list[Stage], training: TrainingConfig) -> float:
    """Linear warmup then linear decay to 0 (as transformers' linear schedule), over the
    whole run or restarted per stage. Reads ``stages`` live, so plateau-shortened
    stages reshape the schedule."""
    start, end = 0, stages[-1].end
    if training.swa is not None:
        factor = swa.swa_lr_factor(training.swa, step, end)
        if factor is not None:
            return factor
    if training.lr_schedule == "per_stage":
        stage = next((s for s in stages if s.start <= step < s.end), stages[-1])
        start, end = stage.start, stage.end
    length, local = max(end - start, 1), step - start
    warmup = int(training.warmup_ratio * length)
    if local < warmup:
        return local / max(1, warmup)
    return max(0.0, (length - local) / max(1, length - warmup))


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


def saved_config(out: Path) -> dict:
    """The config a run was started with, completed with today's defaults for keys added to
    the schema since (so a run started by an older dskd resumes when nothing really changed)."""
    from dskd.config import ExperimentConfig, build_dataclass

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
    teacher: TeacherSide | cache.TeacherCache | None
    student_layers: list[int]
    resume_tag: str | None
    terms: nn.ModuleDict
    pairs: tuple[tuple[int, int], ...] = ()  # every mapped (student layer, teacher layer)
    student_capture: QKCapture | None = None
    holdout_set: object = None  # `data.holdout`: training examples kept out of training (RW-KD's meta batches)
    noisy_labels: int | None = None  # `data.label_noise`: how many training labels were changed
    candidates: object = None  # `data.augment`: Glitter's candidate pool (glitter.Candidates)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"logits"}).union(*(term.needs for term in self.terms.values()))


def prepare(cfg: ExperimentConfig, role: str, out: Path, deepspeed_path: str | None, resume: bool, overwrite: bool,
            auto_resume: bool = False) -> Job:
    eng.init_distributed()
    training = cfg.finetune if role == "finetune" else cfg.training
    losses = {"hard_ce": {"weight": 1.0}} if role == "finetune" else cfg.losses
    ds_config, ds_file = eng.load_ds_config(deepspeed_path or training.deepspeed, training)
    eng.check_precision_supported(ds_config, ds_file)
    resume_tag = check_output_dir(out, resume, overwrite, cfg, auto_resume)

    task = data.get_task(cfg.data.task)
    if role == "distill" and cfg.teacher.cache is not None:
        return _prepare_cached(cfg, out, training, losses, ds_config, ds_file, task, resume_tag)
    if role == "finetune" and cfg.teacher.path is None and cfg.teacher.arch is None:
        raise DskdError("`dskd finetune` trains the teacher, so it needs `teacher.path` or `teacher.arch`; "
                        "`teacher.cache` only serves `dskd distill`")
    tokenizer = models.load_tokenizer(cfg.teacher)
    fingerprints: dict = {}
    train_set, dev_set = load_data(cfg, task, tokenizer, fingerprints if cfg.data.augment else None)
    train_set, holdout_set, noisy = training_split(cfg, task, train_set)
    teacher = load_teacher(cfg, task, tokenizer, for_finetune=role == "finetune")
    if role == "finetune":
        job = Job(cfg, role, out, training, losses, ds_config, ds_file, task, tokenizer, train_set, dev_set,
                  teacher, None, [], resume_tag, build_loss_terms(losses))
        job.holdout_set, job.noisy_labels = holdout_set, noisy
        return job
    student, layers = models.build_student(cfg.student, teacher, task.num_labels, tokenizer.pad_token_id, cfg.seed)
    teacher = models.freeze(teacher, eng.run_dtype(ds_config), eng.device())
    terms, pairs = build_terms(cfg, losses, student.config, teacher.config, layers)
    bind_data(terms, train_set, task, cfg.seed)
    job = Job(cfg, role, out, training, losses, ds_config, ds_file, task, tokenizer, train_set, dev_set,
              student, TeacherSide(teacher), layers, resume_tag, terms, pairs)
    job.holdout_set, job.noisy_labels = holdout_set, noisy
    job.candidates = glitter.open_candidates(cfg, task, tokenizer, fingerprints)
    check_stage_layers(cfg, pairs, terms)
    check_stage_teachers(cfg, task, teacher.config)
    bind_job(job)
    if job.needs & CAPTURED:
        job.student_capture = QKCapture(student, [s for s, _ in pairs], "student")
        job.teacher.capture = QKCapture(teacher, [t for _, t in pairs], "teacher")
    return job


SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "model_type")


def check_stage_teachers(cfg: ExperimentConfig, task, main_config) -> None:
    """Each stage's own teacher (Pro-KD) must exist, fit the task and have the main teacher's
    shape, which the layer map, the loss terms' projections and the tokenizer were built for.
    Checked from config files before anything runs."""
    for i, stage in enumerate(cfg.schedule):
        if stage.teacher is None:
            continue
        key = f"schedule[{i}].teacher"
        source = resolve_stage_teacher(cfg, stage.teacher, key)
        other = models.pretrained_config(source, task.num_labels, key)
        diffs = [f"{name} {getattr(other, name, None)} vs {getattr(main_config, name, None)}" for name in SHAPE_KEYS
                 if getattr(other, name, None) != getattr(main_config, name, None)]
        if diffs:
            raise DskdError(f"`{key}` ({stage.name}: {source}) differs in shape from the main teacher "
                            f"({'; '.join(diffs)}); every stage teacher must be a checkpoint of the same model")


def resolve_stage_teacher(cfg: ExperimentConfig, value: str, key: str) -> str:
    """A stage's teacher as a path. ``trajectory:K`` is the K-th (1-based; negative counts
    from the end) model that `finetune.trajectory` exported into ``teacher.path``, by step,
    so one recipe serves every task's teacher."""
    if not value.startswith("trajectory:"):
        return value
    index = value[len("trajectory:"):]
    if not index.lstrip("-").isdigit() or int(index) == 0:
        raise DskdError(f"`{key}`: {value!r} must be trajectory:K with K = 1, 2, ... (or -1, -2, ... from the end)")
    if cfg.teacher.path is None:
        raise DskdError(f"`{key}`: {value!r} picks from the trajectory of `teacher.path`, which is not set")
    folder = Path(resolve_path(cfg.teacher.path)) / TRAJECTORY_DIR
    found = sorted(p for p in folder.iterdir() if (p / "config.json").is_file()) if folder.is_dir() else []
    k = int(index)
    if not found or not (1 <= k <= len(found) or 1 <= -k <= len(found)):
        raise DskdError(f"`{key}`: {value!r} but {folder} holds {len(found)} exported teacher(s); fine-tune the "
                        "teacher with `finetune.trajectory: true` (it exports one per checkpoint)")
    return str(found[k - 1] if k > 0 else found[k])


def stage_teacher_loader(job: "Job"):
    """What ``TeacherSide.use`` calls to build a stage's teacher, frozen in the run's dtype."""
    def load(source: str | None) -> nn.Module:
        model = (models.load_pretrained(resolve_stage_teacher(job.cfg, source, "schedule[].teacher"),
                                        job.task.num_labels, for_finetune=False, key="schedule[].teacher")
                 if source is not None else load_teacher(job.cfg, job.task, job.tokenizer))
        return models.freeze(model, eng.run_dtype(job.ds_config), eng.device())

    return load


def load_teacher(cfg: ExperimentConfig, task, tokenizer, for_finetune: bool = False) -> nn.Module:
    if cfg.teacher.path is not None:
        return models.load_pretrained(cfg.teacher.path, task.num_labels, for_finetune=for_finetune)
    return models.build_from_arch(cfg.teacher.arch, len(tokenizer), task.num_labels, tokenizer.pad_token_id,
                                  cfg.seed, "teacher.arch")


def cache_tokenizer(cfg: ExperimentConfig, store: cache.TeacherCache):
    """The configured tokenizer, else the copy the cache was written with."""
    if cfg.teacher.tokenizer or cfg.teacher.path:
        return models.load_tokenizer(cfg.teacher)
    return models.load_tokenizer(TeacherConfig(tokenizer=str(store.path / "tokenizer")), key="teacher.cache")


def _prepare_cached(cfg, out, training, losses, ds_config, ds_file, task, resume_tag) -> Job:
    """A distillation job whose teacher outputs come from ``teacher.cache``: the teacher
    model is never built; only the tensors copied into the student are read from its files."""
    from types import SimpleNamespace

    store = cache.TeacherCache(resolve_path(cfg.teacher.cache))
    tokenizer = cache_tokenizer(cfg, store)
    fingerprints: dict = {}
    train_set, dev_set = load_data(cfg, task, tokenizer, fingerprints)
    train_set, holdout_set, noisy = training_split(cfg, task, train_set)
    t_config = SimpleNamespace(**store.teacher_config)
    if t_config.num_labels != task.num_labels:
        raise DskdError(f"`teacher.cache`: {store.path} holds a teacher with {t_config.num_labels} output labels; "
                        f"{task.name} has {task.num_labels}")
    if cfg.student.init_from_teacher:
        found = models.student_from_teacher_files(cfg.teacher.path, cfg.student, task.num_labels) \
            if cfg.teacher.path is not None else None
        if found is None:  # no safetensors (or a teacher built from arch): build it, copy, drop it
            found = models.student_from_teacher(load_teacher(cfg, task, tokenizer), cfg.student)
        student, layers = found
    else:
        student, layers = models.build_from_arch(cfg.student.arch, t_config.vocab_size, task.num_labels,
                                                 tokenizer.pad_token_id, cfg.seed + 1, "student.arch"), []
    student = models.apply_kronecker(student, cfg.student, cfg.seed)
    terms, pairs = build_terms(cfg, losses, student.config, t_config, layers)
    bind_data(terms, train_set, task, cfg.seed)
    check_stage_layers(cfg, pairs, terms)
    has_teacher = cfg.teacher.path is not None or cfg.teacher.arch is not None
    candidates = glitter.open_candidates(cfg, task, tokenizer, fingerprints)  # before the identity: it names the pool
    identity = cache.identity_for(cfg, tokenizer, fingerprints,
                                  cache.teacher_fingerprint(cfg.teacher, cfg.seed) if has_teacher else None)
    store.check(identity, cache.spec_for(losses, pairs), ["train", "dev"] + ([cache.AUGMENT] if candidates else []))
    store.verify(cfg.teacher.cache_check, eng.rank(), eng.world_size())
    job = Job(cfg, "distill", out, training, losses, ds_config, ds_file, task, tokenizer, train_set, dev_set,
              student, store, layers, resume_tag, terms, pairs)
    job.holdout_set, job.noisy_labels = holdout_set, noisy
    job.candidates = candidates
    bind_job(job)
    if job.needs & CAPTURED:
        job.student_capture = QKCapture(student, [s for s, _ in pairs], "student")
    return job


def layerwise_losses(losses: dict) -> bool:
    return any(issubclass(LOSS_REGISTRY[term_type(n, spec)], LayerwiseTerm) for n, spec in losses.items())


def mapped_pairs(cfg: ExperimentConfig, losses: dict, init_layers: list[int], n_student: int, n_teacher: int):
    """Every mapped (student layer, teacher layer) pair; none without a layer-wise term."""
    if not layerwise_losses(losses):
        if cfg.layer_map is not None:
            raise DskdError("`layer_map` is set but no loss term compares layers; add attention_kl or cls_cosine, "
                            "or drop layer_map")
        return ()
    return tuple(models.resolve_layer_map(cfg.layer_map, init_layers, n_student, n_teacher))


def build_terms(cfg: ExperimentConfig, losses: dict, s_cfg, t_cfg, init_layers: list[int]):
    """The loss terms, bound to the layer map when a term compares internal layers.
    ``s_cfg``/``t_cfg``: the models' configs (depth, width, heads)."""
    pairs = mapped_pairs(cfg, losses, init_layers, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    geometry = LayerGeometry(pairs, s_cfg.hidden_size, t_cfg.hidden_size, s_cfg.num_attention_heads,
                             t_cfg.num_attention_heads, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers) \
        if pairs else None
    terms = build_loss_terms(losses, geometry, cfg.seed)
    for name, term in terms.items():
        term.bind_run(cfg, f"losses.{name}")  # e.g. Universal-KD's probes must be of this teacher and task
    return terms, pairs


def bind_data(terms: nn.ModuleDict, train_set, task, seed: int) -> None:
    """Give terms that keep per-example state (CoDIR's memory bank) the training set's labels and indices."""
    if not any(isinstance(t, LayerwiseTerm) and type(t).bind_data is not LayerwiseTerm.bind_data
               for t in terms.values()):
        return
    labels = torch.as_tensor(train_set.data.column("label").to_numpy())
    idx = torch.as_tensor(train_set.data.column("idx").to_numpy()).long()
    for term in terms.values():
        if isinstance(term, LayerwiseTerm):
            term.bind_data(labels, idx, task.is_regression, seed)


def check_stage_layers(cfg: ExperimentConfig, pairs: tuple, terms: nn.ModuleDict | None = None) -> None:
    mapped = {s for s, _ in pairs}
    whole = [name for name, t in (terms or {}).items() if isinstance(t, LayerwiseTerm) and not t.per_pair]
    for i, stage in enumerate(cfg.schedule):
        on = [name for name in whole if (stage.losses.get(name, 0) if stage.losses else cfg.losses[name]["weight"]) > 0]
        if on and (stage.layers is not None or stage.per_layer is not None):
            raise DskdError(f"`schedule[{i}]` ({stage.name}) distils only some mapped layers, but `losses.{on[0]}` "
                            "compares all of them at once; turn it off in that stage or drop `layers`/`per_layer`")
        for j, layer in enumerate(stage.layers or []):
            if layer not in mapped:
                raise DskdError(
                    f"`schedule[{i}].layers[{j}]` ({stage.name}) is student layer {layer}, which is not mapped "
                    f"to the teacher (mapped: {sorted(mapped) or 'none; configure attention_kl or cls_cosine'})"
                )
        if stage.per_layer is not None and not mapped:
            raise DskdError(f"`schedule[{i}].per_layer` ({stage.name}) needs a layer-wise loss term "
                            "(attention_kl or cls_cosine) to distil layer by layer")


def training_split(cfg: ExperimentConfig, task, train_set):
    """The examples trained on, the held-out ones (``data.holdout``, chosen first so they keep
    their labels) and how many training labels ``data.label_noise`` changed (None: no noise)."""
    train_set, holdout_set = data.split_holdout(train_set, cfg.data.holdout, cfg.seed)
    noisy = None
    if cfg.data.label_noise is not None:
        train_set, noisy = data.apply_label_noise(train_set, task, cfg.data.label_noise)
    return train_set, holdout_set, noisy


def load_data(cfg: ExperimentConfig, task, tokenizer, fingerprints: dict | None = None):
    """Rank 0 tokenises first so the other ranks read the ``datasets`` cache it wrote.
    ``fingerprints``, when given, receives each raw split's size and content hash."""
    splits = {}
    for order in (0, 1):
        if (eng.rank() == 0) == (order == 0):
            for split, limit in (("train", cfg.data.train_limit), ("dev", cfg.data.dev_limit)):
                raw = data.load_split(task, cfg.data.path, split, limit)
                if fingerprints is not None:
                    fingerprints[split] = {"examples": len(raw), "hash": cache.data_fingerprint(raw)}
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
            for name in (RUN_FILE, METRICS_FILE, CONFIG_FILE, "checkpoints", "tensorboard", "model", MODEL_CONFIG_DIR,
                         STAGE_BEST_DIR, TRAJECTORY_DIR):
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
            teacher_cache=str(job.teacher.path) if isinstance(job.teacher, cache.TeacherCache) else None,
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


def stage_pairs(stage: Stage, pairs: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The mapped pairs a stage distils (none when it has no layer-wise term on)."""
    if stage.layers is None:
        return pairs
    return tuple(p for p in pairs if p[0] in stage.layers)


def losses_on(engine, teacher: TeacherSide | None, batch: dict, weights: dict[str, float], pairs,
              split: str = "train"):
    """Teacher outputs (if a term in ``weights`` uses them), then the student's weighted losses."""
    module = engine.module
    if not any(isinstance(module.terms[name], LayerwiseTerm) for name in weights):
        pairs = ()
    teacher_out = None
    if teacher is not None and any(module.terms[name].uses_teacher for name in weights):
        teacher_out = teacher.outputs(batch, module.needs, pairs, split)
        if "augment" in batch:  # Glitter's candidates: the cache's `augment` split (by candidate id), or online
            teacher_out["augment"] = teacher.outputs(batch["augment"], frozenset({"logits"}), (), cache.AUGMENT)
    return engine(batch, teacher_out, weights, pairs, split)


@dataclass
class StepContext:
    """What ``LossTerm.before_micro_step`` is told about the micro-step about to run."""

    job: Job
    engine: object
    stage: Stage
    step: int  # the optimizer step (0-based) this micro-step belongs to
    micro: int  # its micro-step, 0 .. grad_accum - 1
    pad_id: int


def bind_job(job: Job) -> None:
    """Let every term check the prepared job and take what it needs (``LossTerm.bind_job``)."""
    for name, term in job.terms.items():
        term.bind_job(job, f"losses.{name}")


def train_step(engine, teacher: TeacherSide | None, batch: dict, weights: dict[str, float], pairs=()):
    """One micro-step: frozen teacher forward (if a term in this stage uses it), student
    forward with the weighted loss terms, backward, and DeepSpeed's step (which applies
    the optimizer only at an accumulation boundary)."""
    total, values = losses_on(engine, teacher, batch, weights, pairs)
    engine.backward(total)
    engine.step()
    return total, values


def _format_metrics(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def _mean_over_ranks(values: list[float]) -> list[float]:
    # On the run's device: NCCL reduces only CUDA tensors.
    tensor = torch.tensor(values, dtype=torch.float64, device=eng.device())
    if eng.world_size() > 1:
        torch.distributed.all_reduce(tensor)
        tensor /= eng.world_size()
    return tensor.tolist()


def first_batches(dataset, batch_size: int, count: int, pad_id: int, device) -> list[dict]:
    """The first ``count`` batches of ``dataset``, in order: fixed held-out batches."""
    n = min(count * batch_size, len(dataset))
    index = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return [{k: v.to(device) for k, v in b.items()} for b in _loader(dataset, index, pad_id)]


def held_out_loss(engine, teacher, batches: list[dict], stage: Stage, pairs) -> float:
    """A stage's weighted loss on fixed dev batches, without dropout: the plateau signal."""
    engine.eval()
    with torch.no_grad():
        total = sum(float(losses_on(engine, teacher, b, stage.weights, stage_pairs(stage, pairs), "dev")[0])
                    for b in batches)
    engine.train()
    return _mean_over_ranks([total / len(batches)])[0]


def attention_snapshot(engine, teacher: TeacherSide, example: dict, pairs, groups, heads: int, monitor, step) -> None:
    """Draw teacher | student attention of every mapped layer for one dev example (rank 0 writes;
    every rank runs the forward, which ZeRO-3 needs)."""
    engine.eval()
    with torch.no_grad():
        student = engine(example, pairs=pairs)
        target = teacher.outputs(example, engine.module.needs, pairs, "dev")
    engine.train()
    for (s, t), s_qk, t_qk in zip(pairs, student["attention_qk"], target["attention_qk"], strict=True):
        monitor.attention_image(f"attention/student_L{s}_teacher_L{t}", s_qk, t_qk, example["attention_mask"],
                                groups, heads, step)


def keep_stage_best(engine, out: Path, state: dict, index: int, result: dict, metric: str, step: int,
                    monitor) -> None:
    """After an evaluation in a ``keep_best`` stage: checkpoint the student when it beats the
    stage's best so far (one such checkpoint is kept, beside the run's own checkpoints so
    their rotation never removes it)."""
    tracked = state.get("stage_best")
    if tracked is not None and tracked["stage"] == index and result[metric] <= tracked["result"][metric]:
        return
    checkpoint.save(engine, out / STAGE_BEST_DIR, step, {"dskd": {"stage": index}}, keep=1)
    state["stage_best"] = {"stage": index, "step": step, "tag": checkpoint.tag_for(step), "result": dict(result)}
    monitor.line(f"[keep_best] step {step}: new best of the stage ({metric}={result[metric]:.4f}) checkpointed")


def restore_stage_best(engine, out: Path, state: dict, stage: Stage, metric: str, monitor) -> None:
    """End of a ``keep_best`` stage: load the weights and optimizer state of its best
    evaluation. The LR schedule and the step counter go on (they are not restored), and
    the run's RNG streams are left alone, so an interrupted run resumes to the same result."""
    best = state["stage_best"]
    if best["step"] != stage.end:
        engine.load_checkpoint(str(out / STAGE_BEST_DIR), tag=best["tag"], load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    state["last_eval"] = dict(best["result"], step=stage.end)
    monitor.line(f"[keep_best] {stage.name} ended at step {stage.end}; continuing from its best weights, "
                 f"step {best['step']} ({metric}={best['result'][metric]:.4f})")
    monitor.text("stage", f"{stage.name}: best weights of step {best['step']} restored", stage.end)


def refresh_lr(engine) -> None:
    """Re-evaluate the LR schedule for the next step after the stage table changed: the
    scheduler computed it from the old table at the last optimizer step."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


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
    mapped_layers = [s for s, _ in job.pairs]
    stages = plan_stages(cfg.schedule if job.role == "distill" else [], job.losses, training, steps_per_epoch,
                         mapped_layers)
    if job.resume_tag is not None and (out / METRICS_FILE).is_file():
        status = json.loads((out / RUN_FILE).read_text()).get("status")
        if status == "completed":
            if rank == 0:
                print(f"{out} already completed; nothing to resume", file=sys.stderr)
            return json.loads((out / METRICS_FILE).read_text())

    _init_output_dir(job, argv)
    seed_everything(cfg.seed + rank)
    module = DistillationModule(job.model, job.terms, job.needs, job.student_capture)
    engine = eng.initialize(module, job.ds_config, training, lambda step: lr_factor(step, stages, training))

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "teacher_metrics": None,
             "stage_bounds": [[st.start, st.end] for st in stages], "plateau": None}
    averager = swa.WeightAverage(engine.module) if training.swa is not None else None
    if job.resume_tag is not None:
        state.update(checkpoint.load(engine, out / "checkpoints", job.resume_tag))
        if averager is not None:
            averager.load(out / "checkpoints" / job.resume_tag)
        # Plateau rules may have ended stages early; the checkpoint holds where they really ended.
        for st, (start, end) in zip(stages, state["stage_bounds"], strict=True):
            st.start, st.end = start, end

    eval_batch = training.batch_size * 2

    def student_logits(batch):
        return engine(batch)["logits"]

    if job.teacher is not None and state["teacher_metrics"] is None:
        state["teacher_metrics"] = evaluate(
            lambda b: job.teacher.outputs(b, frozenset({"logits"}), (), "dev")["logits"],
            job.dev_set, task, pad_id, eval_batch, device,
        )

    monitor = Monitor(out / "tensorboard", rank == 0, stages[-1].end, state["step"], job.role)
    if isinstance(job.teacher, cache.TeacherCache):
        monitor.line(f"[teacher] outputs read from the cache {job.teacher.path}; no teacher model is loaded")
    if state["teacher_metrics"] is not None:
        monitor.line(f"[teacher] dev {task.name}: {_format_metrics(state['teacher_metrics'])}")
        monitor.scalars({f"teacher/{k}": v for k, v in state["teacher_metrics"].items()}, 0)
    describe = ", ".join(
        f"{st.name}[{st.start}:{st.end}]({'+'.join(st.weights)}"
        + (f" layers {','.join(map(str, st.layers))}" if st.layers is not None and job.pairs else "")
        + (" until plateau" if st.plateau else "") + ")"
        for st in stages
    )
    if job.holdout_set is not None:
        monitor.line(f"[data] {len(job.holdout_set)} training examples held out (data.holdout {cfg.data.holdout})")
    if job.noisy_labels is not None:
        noise = cfg.data.label_noise
        monitor.line(f"[data] label noise ({noise.kind}, rate {noise.rate}, seed {noise.seed}): {job.noisy_labels} "
                     f"of {len(job.train_set)} training labels changed")
    if job.role == "distill" and getattr(job.model.config, "kronecker", None):
        from dskd import kronecker

        monitor.line(kronecker.describe(job.model))
    monitor.line(
        f"[{job.role}] {len(job.train_set)} train / {len(job.dev_set)} dev examples, {world} rank(s), "
        f"{steps_per_epoch} steps/epoch, {stages[-1].end} steps, stages: {describe}"
        + (f", layer map (student, teacher): {list(job.pairs)}" if job.pairs else "")
    )
    if job.resume_tag is not None:
        # Say so: a requeued job (--auto-resume) otherwise looks like a fresh start in its log.
        monitor.line(f"[resume] continuing from checkpoint {job.resume_tag} at step {state['step']} "
                     f"of {stages[-1].end} (epoch {state['epoch']})")

    attention_terms = [t for name, t in job.terms.items() if isinstance(t, AttentionKL)]
    snapshot_example = None
    if attention_terms and training.attention_images and job.teacher is not None:
        row = data.collate([job.dev_set[0]], pad_id)
        snapshot_example = {k: v.to(device) for k, v in row.items()}
    held_out: dict[int, list[dict]] = {}  # plateau.batches -> the first dev batches

    def stage_at(step: int) -> Stage:
        return next(st for st in stages if st.start <= step < st.end)

    def save() -> None:
        state["stage_bounds"] = [[st.start, st.end] for st in stages]
        tag = checkpoint.save(engine, out / "checkpoints", state["step"], {"dskd": dict(state)},
                              training.keep_checkpoints, averager.save if averager is not None else None)
        if training.trajectory:
            if rank == 0:
                from dskd.export import export_run

                export_run(out, out / TRAJECTORY_DIR / tag, tag)
            eng.barrier()

    sums: dict[str, torch.Tensor] = {}
    micro_count = 0
    window_start, window_steps = time.perf_counter(), 0
    samples_per_step = world * training.batch_size * training.grad_accum
    last_save_step = -1
    current_stage = stage_at(state["step"]).name if state["step"] < stages[-1].end else None
    halted = preempted = False
    stop = StopRequest()
    engine.train()

    while state["step"] < stages[-1].end and not halted and not preempted:
        batches = epoch_batches(len(job.train_set), state["epoch"], cfg.seed, rank, world,
                                training.batch_size, training.grad_accum)
        loader = _loader(job.train_set, batches[state["batch_in_epoch"] :], pad_id)
        for batch in loader:
            stage = stage_at(state["step"])
            if stage.name != current_stage:
                monitor.line(f"[stage] step {state['step']}: {current_stage} -> {stage.name}")
                monitor.text("stage", f"step {state['step']}: {current_stage} -> {stage.name}", state["step"])
                current_stage = stage.name
            if isinstance(job.teacher, TeacherSide) and job.teacher.use(stage.teacher, stage_teacher_loader(job)):
                scores = evaluate(lambda b: job.teacher.outputs(b, frozenset({"logits"}), (), "dev")["logits"],
                                  job.dev_set, task, pad_id, eval_batch, device)
                described = resolve_stage_teacher(cfg, stage.teacher, "schedule[].teacher") if stage.teacher \
                    else cfg.teacher.path or "the teacher built from teacher.arch"
                monitor.line(f"[teacher] stage {stage.name} distils from {described} "
                             f"(dev {_format_metrics(scores)})")
                monitor.scalars({f"teacher/stage/{k}": v for k, v in scores.items()}, state["step"])
            batch = {k: v.to(device) for k, v in batch.items()}
            engine.module.set_progress(stage.progress(state["step"]))
            context = StepContext(job, engine, stage, state["step"], state["batch_in_epoch"] % training.grad_accum,
                                  pad_id)
            for name in stage.weights:  # per-step work of terms beside their loss (RW-KD, Glitter, MATE-KD)
                batch = engine.module.terms[name].before_micro_step(context, batch)
            total, values = train_step(engine, job.teacher, batch, stage.weights, stage_pairs(stage, job.pairs))
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
            if averager is not None and swa.averages_at(training.swa, step, stages[-1].end):
                averager.update()
                monitor.scalars({"swa/snapshots": float(averager.count)}, step)

            if step % training.log_every == 0 or step == stages[-1].end:
                names = sorted(sums)
                means = _mean_over_ranks([float(sums[n]) / micro_count for n in names])
                elapsed = time.perf_counter() - window_start
                scalars = {f"train/loss/{n}": v for n, v in zip(names, means, strict=True)}
                scalars["train/lr"] = engine.get_lr()[0]
                scalars["train/samples_per_s"] = window_steps * samples_per_step / max(elapsed, 1e-9)
                scalars["train/stage"] = float(stages.index(stage))
                monitor.scalars(scalars, step)
                sums, micro_count = {}, 0
                window_start, window_steps = time.perf_counter(), 0

            if stage.plateau is not None and step < stage.end and (step - stage.start) % stage.plateau.every == 0:
                count = stage.plateau.batches
                if count not in held_out:
                    held_out[count] = first_batches(job.dev_set, training.batch_size, count, pad_id, device)
                loss = held_out_loss(engine, job.teacher, held_out[count], stage, job.pairs)
                index = stages.index(stage)
                track = state["plateau"] if state["plateau"] and state["plateau"]["stage"] == index else None
                if track is None or loss < track["best"] - stage.plateau.min_delta:
                    track = {"stage": index, "best": loss, "bad": 0}
                else:
                    track["bad"] += 1
                state["plateau"] = track
                monitor.scalars({f"plateau/{stage.name}": loss}, step)
                if track["bad"] >= stage.plateau.patience:
                    monitor.line(f"[plateau] {stage.name}: held-out loss {loss:.4f} has not improved on "
                                 f"{track['best']:.4f} for {track['bad']} check(s); next stage at step {step}")
                    shorten_stage(stages, index, step)
                    monitor.set_total(stages[-1].end)
                    refresh_lr(engine)

            finished = step == stages[-1].end
            halting = training.halt_after_steps is not None and step == training.halt_after_steps and not finished
            if (training.eval_every and step % training.eval_every == 0) or (
                not training.eval_every and end_of_epoch
            ) or finished or (stage.keep_best and step == stage.end):
                engine.eval()
                with averager.applied() if averager is not None else contextlib.nullcontext():
                    result = evaluate(student_logits, job.dev_set, task, pad_id, eval_batch, device)
                engine.train()
                main = result[task.main_metric]
                if state["best"] is None or main > state["best"][task.main_metric]:
                    state["best"] = dict(result, step=step)
                monitor.scalars({f"eval/{k}": v for k, v in result.items()}, step)
                monitor.line(
                    f"[eval] step {step}/{stages[-1].end} epoch {step / steps_per_epoch:.2f} "
                    f"{task.name}: {_format_metrics(result)} (best {task.main_metric}="
                    f"{state['best'][task.main_metric]:.4f} at step {state['best']['step']})"
                )
                state["last_eval"] = dict(result, step=step)
                if stage.keep_best:
                    keep_stage_best(engine, out, state, stages.index(stage), result, task.main_metric, step,
                                    monitor)
                    if step == stage.end:
                        restore_stage_best(engine, out, state, stage, task.main_metric, monitor)
                if snapshot_example is not None:
                    attention_snapshot(engine, job.teacher, snapshot_example, job.pairs, attention_terms[0].groups,
                                       training.attention_images, monitor, step)
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
            if stop.agreed(device):  # a scheduler signal on any rank: checkpoint this step and leave
                if last_save_step != step:
                    save()
                    last_save_step = step
                preempted = True
                break
    if not halted and not preempted and state.get("last_eval"):
        from dskd.report import flatten

        final = {f"hparams/{k}": v for k, v in state["last_eval"].items() if k != "step"}
        monitor.hparams(flatten(to_dict(cfg)), final)
    monitor.close()
    stop.restore()

    if preempted:
        _set_status(out, "preempted")
        if rank == 0:
            print(f"[preempt] {stop.name()}: checkpoint at step {state['step']}; exiting with code "
                  f"{EXIT_PREEMPTED} so the job is requeued (continue with --auto-resume or --resume)",
                  file=sys.stderr, flush=True)
        return {"preempted": True, "step": state["step"]}

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
