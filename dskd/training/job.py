"""Preparing a job: everything that can fail on user input (config, DeepSpeed JSON and
precision, the output folder's state, data files, tokenizer, teacher or its cache, student
shapes, every loss term and method) is checked here, before the run folder is written, so
a mistake never costs a previous run's results. New checks belong here or in a plugin's
``check`` / ``bind_job`` hook, raising ``DskdError`` with the key or file in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from dskd import data, models
from dskd.config import ExperimentConfig, TrainingConfig, check_trained_teacher, resolve_path
from dskd.errors import DskdError
from dskd.losses import LayerGeometry, build_loss_terms, mapped_pairs, spec_for, teacher_head_reader, uses_mlm
from dskd.methods import Method, enabled_methods
from dskd.models import families
from dskd.models.capture import QKCapture
from dskd.runtime import dist, reshard
from dskd.teacher import cache
from dskd.teacher.cache_reader import TeacherCache
from dskd.teacher.online import TeacherSide, cache_tokenizer, load_teacher
from dskd.training import engine as eng
from dskd.training import rescale
from dskd.training.run_dir import check_output_dir, read_run_info
from dskd.training.stages import check_stage_layers

CAPTURED = {"attention_qk", "attention_v"}  # needs read by forward hooks (dskd.models.capture), not from outputs


@dataclass
class Preparation:
    """What ``Method.add_data`` sees and may add to, before the job exists."""

    cfg: ExperimentConfig
    role: str
    task: object
    tokenizer: object
    fingerprints: dict  # raw split -> size and content hash (the teacher cache's identity)
    extras: dict = field(default_factory=dict)  # data methods add, by name (job.extras)
    cache_splits: list = field(default_factory=lambda: ["train", "dev"])  # what a teacher cache must hold
    notes: list = field(default_factory=list)  # what was done to the data, logged at the start (job.notes)


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
    teacher: TeacherSide | TeacherCache | None
    student_layers: list[int]
    resume_tag: str | None
    terms: nn.ModuleDict
    pairs: tuple[tuple[int, int], ...] = ()  # every mapped (student layer, teacher layer)
    student_capture: QKCapture | None = None
    methods: list[Method] = field(default_factory=list)  # the enabled run-level plugins
    extras: dict = field(default_factory=dict)  # data added by the data config or methods: "holdout", ...
    notes: list[str] = field(default_factory=list)  # what was done to the data, logged at the start
    resume_world: int | None = None  # the ranks that wrote the resumed checkpoint, when not this job's

    @property
    def needs(self) -> frozenset[str]:
        scored = frozenset({self.task.prediction} if self.task.prediction else ())  # a corpus job scores none
        return scored.union(*(term.needs for term in self.terms.values()))

    @property
    def zero_stage(self) -> int:
        return eng.zero_stage(self.ds_config)

    @property
    def dtype(self) -> torch.dtype:
        return eng.run_dtype(self.ds_config)

    @property
    def device(self) -> torch.device:
        return dist.device()

    @property
    def cached(self) -> bool:
        return isinstance(self.teacher, TeacherCache)


def prepare(cfg: ExperimentConfig, role: str, out: Path, deepspeed_path: str | None, resume: bool, overwrite: bool,
            auto_resume: bool = False) -> Job:
    if role == "distill":
        check_trained_teacher(cfg, "distill")
    eng.init_distributed()
    section = "finetune" if role == "finetune" else "training"
    training = eng.at_world_size(getattr(cfg, section), eng.world_size(), section)
    losses = {"hard_ce": {"weight": 1.0}} if role == "finetune" else cfg.losses
    ds_config, ds_file = eng.load_ds_config(deepspeed_path or training.deepspeed, training)
    eng.check_precision_supported(ds_config, ds_file)
    if role == "finetune" and cfg.data.corpus is not None:
        raise DskdError("`dskd finetune` trains a teacher on a labelled task, but `data.corpus` makes this a corpus "
                        "job; distil on the corpus with `dskd distill`, or fine-tune on a GLUE task (drop data.corpus)")
    resume_tag = check_output_dir(out, resume, overwrite, cfg, auto_resume, training.checkpoint_check)
    resume_world = None  # the ranks that wrote the checkpoint, when not this job's
    if resume_tag is not None:
        folder = out / "checkpoints" / resume_tag
        resume_world = rescale.check(folder, rescale.written_by(folder, read_run_info(out).get("world_size")),
                                     training, getattr(cfg, section), section)
        if resume_world is not None and reshard.partitioned(folder):
            ds_config = reshard.reload_config(ds_config)  # re-partitions the optimizer state on load
    task = data.task_for(cfg, uses_mlm(losses))
    methods = enabled_methods(cfg, role)
    common = dict(cfg=cfg, role=role, out=out, training=training, losses=losses, ds_config=ds_config,
                  ds_file=ds_file, task=task, resume_tag=resume_tag, methods=methods, resume_world=resume_world)
    if role == "distill" and cfg.teacher.cache is not None:
        return _prepare_cached(common)
    if role == "finetune" and cfg.teacher.path is None and cfg.teacher.arch is None:
        raise DskdError("`dskd finetune` trains the teacher, so it needs `teacher.path` or `teacher.arch`; "
                        "`teacher.cache` only serves `dskd distill`")
    tokenizer = models.load_tokenizer(cfg.teacher)
    prep, train_set, dev_set = _load_data(cfg, role, task, tokenizer, methods)
    teacher = load_teacher(cfg, task, tokenizer, for_finetune=role == "finetune",
                           head_needed_by=teacher_head_reader(losses))
    check_positions(cfg.data.max_length, teacher.config, "teacher")
    if role == "finetune":
        job = Job(**common, tokenizer=tokenizer, train_set=train_set, dev_set=dev_set, model=teacher, teacher=None,
                  student_layers=[], terms=build_loss_terms(losses), extras=prep.extras, notes=prep.notes)
        return _finish(job)
    student, layers = models.build_student(cfg.student, teacher, task.num_labels, tokenizer.pad_token_id, cfg.seed,
                                           task.model_class)
    check_positions(cfg.data.max_length, student.config, "student")
    for method in methods:
        student = method.build_student(student, cfg)
    teacher = models.freeze(teacher, eng.run_dtype(ds_config), eng.device())
    terms, pairs = build_terms(cfg, losses, student.config, teacher.config, layers)
    job = Job(**common, tokenizer=tokenizer, train_set=train_set, dev_set=dev_set, model=student,
              teacher=TeacherSide(teacher), student_layers=layers, terms=terms, pairs=pairs, extras=prep.extras,
              notes=prep.notes)
    job = _finish(job)
    if job.needs & CAPTURED:
        job.teacher.capture = QKCapture(teacher, [t for _, t in pairs], "teacher")
    return job


def check_positions(max_length: int, config, who: str) -> None:
    """`data.max_length` must fit the model's position embeddings (RoBERTa's start after padding)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        positions -= (config.pad_token_id or 0) + 1
    if max_length > positions:
        raise DskdError(f"`data.max_length` is {max_length}, but the {who} has {positions} positions; "
                        f"set data.max_length to at most {positions}")


def _load_data(cfg, role, task, tokenizer, methods):
    """Both splits, the training split's transforms, and the data methods add."""
    prep = Preparation(cfg, role, task, tokenizer, {})
    train_set, dev_set = data.load_data(cfg, task, tokenizer, prep.fingerprints)
    train_set, holdout_set, noisy = data.training_split(cfg, task, train_set)
    if holdout_set is not None:
        prep.extras["holdout"] = holdout_set
        prep.notes.append(f"[data] {len(holdout_set)} training examples held out (data.holdout {cfg.data.holdout})")
    if cfg.data.unlabeled:
        labelled = data.labelled_rows(train_set)
        prep.notes.append(f"[data] {labelled} labelled training examples and {len(train_set) - labelled} without "
                          "labels (data.unlabeled): the label terms skip those, the teacher's terms use all")
    if noisy is not None:
        noise = cfg.data.label_noise
        prep.notes.append(f"[data] label noise ({noise.kind}, rate {noise.rate}, seed {noise.seed}): {noisy} "
                          f"of {len(train_set)} training labels changed")
    for method in methods:
        method.add_data(prep)
    return prep, train_set, dev_set


def _finish(job: Job) -> Job:
    """The checks that need the whole job, then the terms' own (``LossTerm.bind_job``), and the
    hooks that read the student's mapped layers."""
    if job.role == "distill":  # the schedule is the distillation's
        check_stage_layers(job.cfg, job.pairs, job.terms)
    for method in job.methods:
        method.check(job)
    for name, term in job.terms.items():
        term.bind_job(job, f"losses.{name}")
    if job.needs & CAPTURED and job.role == "distill":
        _check_attention_families(job)
        job.student_capture = QKCapture(job.model, [s for s, _ in job.pairs], "student")
    return job


def _check_attention_families(job: Job) -> None:
    """Terms that recompute attention from Q/K (/V) only serve families whose attention that
    reproduces; refuse the others by term and family before anything is written."""
    terms = [f"losses.{name}" for name, term in job.terms.items() if term.needs & CAPTURED]
    teacher = job.teacher.model.config if isinstance(job.teacher, TeacherSide) else \
        SimpleNamespace(**job.teacher.teacher_config)
    for who, config in (("student", job.model.config), ("teacher", teacher)):
        families.check_attention(config, who, terms)


def _prepare_cached(common: dict) -> Job:
    """A distillation job whose teacher outputs come from ``teacher.cache``: the teacher
    model is never built; only the tensors copied into the student are read from its files."""
    cfg, task, losses = common["cfg"], common["task"], common["losses"]
    store = TeacherCache(resolve_path(cfg.teacher.cache))
    tokenizer = cache_tokenizer(cfg, store)
    prep, train_set, dev_set = _load_data(cfg, "distill", task, tokenizer, common["methods"])
    t_config = SimpleNamespace(**store.teacher_config)
    if t_config.num_labels != task.num_labels:
        raise DskdError(f"`teacher.cache`: {store.path} holds a teacher with {t_config.num_labels} output labels; "
                        f"{task.name} has {task.num_labels}")
    if cfg.student.init is not None:  # a stage-1 student (two-stage distillation), as the online path takes it
        student, layers = models.student_from_folder(cfg.student.init, task.num_labels, cfg.seed, task.model_class), []
    elif cfg.student.init_from_teacher:
        found = models.student_from_teacher_files(cfg.teacher.path, cfg.student, task.num_labels) \
            if cfg.teacher.path is not None else None
        if found is None:  # no safetensors (or a teacher built from arch): build it, copy, drop it
            found = models.student_from_teacher(load_teacher(cfg, task, tokenizer), cfg.student)
        student, layers = found
    else:
        student, layers = models.build_from_arch(cfg.student.arch, t_config.vocab_size, task.num_labels,
                                                 tokenizer.pad_token_id, cfg.seed + 1, "student.arch"), []
    for method in common["methods"]:
        student = method.build_student(student, cfg)
    terms, pairs = build_terms(cfg, losses, student.config, t_config, layers)
    has_teacher = cfg.teacher.path is not None or cfg.teacher.arch is not None
    identity = cache.identity_for(cfg, tokenizer, prep.fingerprints,
                                  cache.teacher_fingerprint(cfg.teacher, cfg.seed) if has_teacher else None)
    store.check(identity, spec_for(losses, pairs), prep.cache_splits)
    store.verify(cfg.teacher.cache_check, eng.rank(), eng.world_size())
    job = Job(**common, tokenizer=tokenizer, train_set=train_set, dev_set=dev_set, model=student, teacher=store,
              student_layers=layers, terms=terms, pairs=pairs, extras=prep.extras, notes=prep.notes)
    return _finish(job)


def build_terms(cfg: ExperimentConfig, losses: dict, s_cfg, t_cfg, init_layers: list[int]):
    """The loss terms, bound to the layer map when a term compares internal layers.
    ``s_cfg``/``t_cfg``: the models' configs (depth, width, heads)."""
    pairs = mapped_pairs(cfg, losses, init_layers, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    geometry = LayerGeometry(pairs, s_cfg.hidden_size, t_cfg.hidden_size, s_cfg.num_attention_heads,
                             t_cfg.num_attention_heads, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers) \
        if pairs else None
    terms = build_loss_terms(losses, geometry, cfg.seed)
    for name, term in terms.items():
        term.bind_run(cfg, f"losses.{name}")  # e.g. files a term reads must be of this teacher and task
    return terms, pairs
