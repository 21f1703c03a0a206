"""Experiment configuration: a typed schema loaded from YAML and validated at load.

One YAML file describes an experiment. It is read into the dataclasses below; every
unknown key, wrong type or inconsistent combination raises ``DskdError`` naming the
dotted key (``training.lr``) and the file, before anything runs. ``--set a.b=value``
overrides are applied to the raw mapping first, so they get the same checks.

Paths may start with ``pkg://`` to point at resources shipped inside the package
(the embedded SST-2 sample and the BERT vocabulary), so the default experiment needs
neither network nor extra files.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dskd.errors import DskdError

PACKAGE_RESOURCES = Path(__file__).resolve().parent / "resources"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(value: str) -> str:
    """Expand ``pkg://name`` (a resource shipped in dskd) and ``pypkg://module/sub/path``
    (a file inside an installed Python package, e.g. a model distributed on PyPI);
    leave other strings as they are."""
    if value.startswith("pkg://"):
        return str(PACKAGE_RESOURCES / value[len("pkg://"):])
    if value.startswith("pypkg://"):
        import importlib.util

        module, _, rest = value[len("pypkg://"):].partition("/")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise DskdError(
                f"{value}: Python package {module!r} is not installed; install it "
                f"(e.g. pip install {module.replace('_', '-')}) or give a folder path instead"
            )
        return str(Path(list(spec.submodule_search_locations)[0]) / rest)
    return value


@dataclass
class ArchConfig:
    """Shape of a Transformer built from config (no pretrained weights)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    model_type: Literal["bert", "roberta"] = "bert"
    max_position: int = 512
    dropout: float = 0.1


@dataclass
class LabelNoiseConfig:
    """Corrupt a share of the training labels, reproducibly (KD under noisy labels)."""

    rate: float  # share of the training labels changed (per class for `asymmetric`)
    # symmetric: a changed label becomes one of the other classes, uniformly; asymmetric:
    # class c becomes flip[c] (default c -> c + 1 for every class but the last).
    kind: Literal["symmetric", "asymmetric"] = "symmetric"
    seed: int = 0
    flip: Optional[dict[str, int]] = None


@dataclass
class DataConfig:
    task: str = "sst2"
    # A GLUE-format folder (the GLUE root or the task folder), pkg://... for the
    # embedded sample, or null to load the task from the Hugging Face hub.
    path: Optional[str] = "pkg://glue-sample"
    max_length: int = 128
    # Keep the first N rows of a split (a deterministic subsample); null keeps all.
    train_limit: Optional[int] = None
    dev_limit: Optional[int] = None
    # Share of the training examples held out of training (a seeded choice, made before any
    # label noise, so they keep their labels): the meta batches of RW-KD.
    holdout: float = 0.0
    label_noise: Optional[LabelNoiseConfig] = None
    # Glitter: a candidate pool written by `dskd augment` (augmented copies of the training
    # examples); read by the `glitter` loss term and by `dskd cache-teacher` (split `augment`).
    augment: Optional[str] = None


@dataclass
class TeacherConfig:
    # A Hugging Face model folder, a hub name, or a dskd run folder (its model/ is used).
    path: Optional[str] = None
    # When `path` is null: build a randomly initialised teacher of this shape (the model
    # `dskd finetune` trains from scratch, or a smoke-test teacher). Ignored when `path`
    # is set, so `--set teacher.path=RUN` distils from a fine-tuned run.
    arch: Optional[ArchConfig] = None
    # Tokenizer folder or vocab.txt; defaults to teacher.path (or the cache's copy).
    tokenizer: Optional[str] = None
    # A teacher cache written by `dskd cache-teacher`: `dskd distill` then reads the
    # teacher's outputs from it by example index and never loads or runs the teacher.
    # With it, `teacher.path` is only needed to copy teacher layers into the student
    # (only those tensors are read) and to check the cache against the teacher's weights.
    cache: Optional[str] = None
    # How the cache's files are checked before use: `full` recomputes every file's
    # checksum (each rank a share of the files), `sizes` only checks shapes and sizes.
    cache_check: Literal["full", "sizes"] = "full"


@dataclass
class KroneckerConfig:
    """KroneckerBERT (docs/methods.md): each named kind of linear map W [out, in] of the student's
    layers becomes A ⊗ B, initialised as the nearest Kronecker product of the copied weight.
    A kind's value is the shape [m2, n2] of the small factor B; A is [out/m2, in/n2], so the
    kind keeps about 1/(m2*n2) of its weights. null leaves that kind dense."""

    attention: Optional[list[int]] = None  # query, key, value, attention output: [hidden, hidden]
    intermediate: Optional[list[int]] = None  # FFN in: [intermediate, hidden]
    output: Optional[list[int]] = None  # FFN out: [hidden, intermediate]
    # The word-embedding table [vocab, hidden] (vocab rounded up to a multiple of m2).
    embeddings: Optional[list[int]] = None
    layers: Optional[list[int]] = None  # student layers (1-based) whose maps are factored; null: all


@dataclass
class StudentConfig:
    # Copy embeddings, these teacher layers (1-based) and the head into the student.
    init_from_teacher: bool = True
    # Which teacher layers to copy; default: every k-th layer for `layers` layers.
    teacher_layers: Optional[list[int]] = None
    layers: Optional[int] = None
    # Shape of a student built from config (required when init_from_teacher is false).
    arch: Optional[ArchConfig] = None
    # KroneckerBERT: factor the student's linear maps as Kronecker products (null: dense).
    kronecker: Optional[KroneckerConfig] = None


@dataclass
class PlateauConfig:
    """End a stage early once its loss on held-out dev batches stops improving."""

    every: int  # optimizer steps between checks
    patience: int = 1  # checks without improvement before the stage ends
    min_delta: float = 0.0  # smaller improvements count as none
    batches: int = 4  # dev batches (of training.batch_size, the first ones) the loss is measured on


@dataclass
class StageConfig:
    """One phase of the schedule: which loss terms are on, with which weights, for how long."""

    name: str
    # Length; with `plateau` it is the most the stage may last.
    epochs: Optional[float] = None
    steps: Optional[int] = None
    # term name -> weight for this stage; terms not listed are off. Empty: all terms
    # at their configured weights.
    losses: dict[str, float] = field(default_factory=dict)
    # Student layers (1-based) whose layer-wise terms (attention_kl, cls_cosine) are on;
    # null: every mapped layer.
    layers: Optional[list[int]] = None
    # Expand into one stage per mapped student layer, bottom-up, sharing this stage's
    # length evenly: `progressive` distils only layer k in stage k (PID), `stacked`
    # layers 1..k (SID).
    per_layer: Optional[Literal["progressive", "stacked"]] = None
    plateau: Optional[PlateauConfig] = None
    # At the end of the stage, put the student (with its optimizer state) back to its best
    # dev evaluation made during the stage, as Annealing-KD's phase 1 -> phase 2. The stage
    # is evaluated at its end even off the `training.eval_every` grid.
    keep_best: bool = False
    # The teacher this stage distils from: a model folder or dskd run (its model/), e.g. one
    # of the checkpoints `finetune.trajectory` exported (Pro-KD). null: `teacher.path`. It
    # must have the main teacher's shape (depth, width, heads, labels, vocabulary).
    teacher: Optional[str] = None


@dataclass
class SwaConfig:
    """Stochastic Weight Averaging: what is evaluated and exported is the running mean of the
    weights from `start` of the run on (docs/methods.md, "SWA")."""

    start: float = 0.75  # share of the run's optimizer steps done when averaging starts
    every: int = 1  # optimizer steps between averaged snapshots; also the cycle length of `cyclic`
    lr: Literal["constant", "cyclic"] = "constant"
    lr_high: float = 0.5  # the SWA LR as a multiple of `lr` (the top of each cycle for `cyclic`)
    lr_low: float = 0.05  # cyclic: the multiple reached at each averaged step


@dataclass
class TrainingConfig:
    epochs: float = 3.0
    batch_size: int = 32  # per rank and micro-step
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    save_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    log_every: int = 10  # optimizer steps
    keep_checkpoints: int = 2
    # Stop (as a preempted job would) after this many optimizer steps, after saving a
    # checkpoint; `--resume` continues from there. For time-boxed jobs and tests.
    halt_after_steps: Optional[int] = None
    # DeepSpeed JSON (ZeRO stage and dtype); the CLI's --deepspeed overrides it.
    deepspeed: str = "ds_configs/zero0_fp32.json"
    # Linear warmup then linear decay to 0 over the whole run (`global`), or restarted
    # in every schedule stage (`per_stage`), which suits sequential stages.
    lr_schedule: Literal["global", "per_stage"] = "global"
    # At each evaluation, draw this many heads of every mapped layer's attention
    # (teacher | student, one fixed dev example) to TensorBoard; 0 turns it off.
    attention_images: int = 4
    # Also export the model at every checkpoint to <run>/trajectory/<tag>/ (a Hugging Face
    # folder, never rotated away): the teacher's training trajectory that Pro-KD stages
    # distil from (`schedule[].teacher`).
    trajectory: bool = False
    # Stochastic Weight Averaging (null: off); see SwaConfig.
    swa: Optional[SwaConfig] = None


def _default_losses() -> dict[str, dict[str, Any]]:
    return {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}}


def _default_finetune() -> TrainingConfig:
    return TrainingConfig(epochs=3.0, lr=5e-5)


@dataclass
class ExperimentConfig:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # term name -> {weight, type (default: the term name), loss parameters}
    losses: dict[str, dict[str, Any]] = field(default_factory=_default_losses)
    # Empty: one stage with every loss term for training.epochs.
    schedule: list[StageConfig] = field(default_factory=list)
    # Teacher layer (1-based) matched by each student layer 1..N in the layer-wise
    # losses. null: the layers the student was initialised from, else uniform
    # (12 -> 6: 2, 4, ..., 12).
    layer_map: Optional[list[int]] = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # Used by `dskd finetune` to train the teacher on the task.
    finetune: TrainingConfig = field(default_factory=_default_finetune)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (nested dataclasses built)."""

    def wrong() -> DskdError:
        return DskdError(f"{source}: `{key}` must be {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise wrong()
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return _convert(value, non_null[0], key, source)
        for candidate in non_null:
            try:
                return _convert(value, candidate, key, source)
            except DskdError:
                continue
        raise wrong()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong()
    if origin is list:
        if not isinstance(value, list):
            raise wrong()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return build_dataclass(tp, value, source, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML follows YAML 1.1, which reads `3e-5` (no dot) as a string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not user input


def _suggest(key: str, known: list[str]) -> str | None:
    """The known key a typo most likely meant: a shared word prefix first (lr_rate -> lr), else spelling."""
    head = key.split("_")[0]
    if head != key and head in known:
        return head
    same_head = [k for k in known if k.split("_")[0] == head]
    if len(same_head) == 1:
        return same_head[0]
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def build_dataclass(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming the dotted key of any problem."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = _suggest(key, list(fields))
            hint = f"; did you mean `{prefix + '.' if prefix else ''}{close}`?" if close else "."
            raise DskdError(
                f"{source}: unknown key `{dotted}`{hint} Known keys here: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(value, hints[key], dotted, source)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise DskdError(f"{source}: missing required key(s) {', '.join('`' + where + m + '`' for m in missing)}")
    return cls(**kwargs)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` to the raw mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise DskdError(f"--set {assignment!r}: expected key.sub=value, e.g. --set training.lr=3e-5")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise DskdError(f"--set {assignment!r}: empty key part in `{dotted}`")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DskdError(f"--set {assignment!r}: `{part}` is not a mapping, cannot set `{dotted}`")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults when ``path`` is None), apply ``--set``s, validate."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DskdError(f"config file {p} does not exist; pass --config with a YAML file such as configs/tiny.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise DskdError(f"{p}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DskdError(f"{p}: the top level must be a mapping of sections (data, teacher, ...)")
        raw = loaded or {}
    for assignment in overrides:
        apply_override(raw, assignment)
    if overrides:
        source = f"{source} (with --set)"
    cfg = build_dataclass(ExperimentConfig, raw, source)
    validate(cfg, source)
    return cfg


def validate(cfg: ExperimentConfig, source: str) -> None:
    """Cross-field checks that types alone cannot express."""

    def fail(message: str) -> None:
        raise DskdError(f"{source}: {message}")

    from dskd.losses import validate_loss_terms  # late import: losses import torch

    if cfg.teacher.path is None and cfg.teacher.arch is None and cfg.teacher.cache is None:
        fail("set `teacher.path` (a model folder or dskd run), `teacher.arch` (build one from config) "
             "or `teacher.cache` (outputs written by `dskd cache-teacher`)")
    if cfg.teacher.path is None and cfg.teacher.tokenizer is None and cfg.teacher.cache is None:
        fail("a teacher built from `teacher.arch` needs `teacher.tokenizer` (a vocab.txt or tokenizer folder)")
    student = cfg.student
    if cfg.teacher.cache is not None and cfg.teacher.path is None and cfg.teacher.arch is None \
            and student.init_from_teacher:
        fail("`student.init_from_teacher` copies teacher layers into the student, which needs `teacher.path` "
             "even with `teacher.cache` (only the copied tensors are read); set it, or build the student "
             "from `student.arch`")
    if not student.init_from_teacher and student.arch is None:
        fail("`student.arch` is required when `student.init_from_teacher` is false")
    if student.init_from_teacher and student.arch is not None:
        fail(
            "`student.arch` cannot be combined with `student.init_from_teacher: true`: a student initialised "
            "from teacher layers has the teacher's width; set `student.layers` or `student.teacher_layers`"
        )
    if student.init_from_teacher and student.layers is None and student.teacher_layers is None:
        fail("set `student.layers` (copied as every k-th teacher layer) or `student.teacher_layers`")
    if student.teacher_layers is not None:
        if not student.teacher_layers:
            fail("`student.teacher_layers` is empty; list the 1-based teacher layers to copy")
        if student.layers is not None and student.layers != len(student.teacher_layers):
            fail(
                f"`student.layers` is {student.layers} but `student.teacher_layers` lists "
                f"{len(student.teacher_layers)} layers; drop one of them or make them agree"
            )
    if student.kronecker is not None:
        _validate_kronecker(student, fail)
    for section in ("data", "training", "finetune"):
        obj = getattr(cfg, section)
        for name in ("max_length", "batch_size", "grad_accum", "keep_checkpoints"):
            if hasattr(obj, name) and getattr(obj, name) < 1:
                fail(f"`{section}.{name}` must be at least 1, got {getattr(obj, name)}")
        for name in ("train_limit", "dev_limit", "halt_after_steps"):
            value = getattr(obj, name, None)
            if value is not None and value < 1:
                fail(f"`{section}.{name}` must be at least 1 (or null), got {value}")
        for name in ("epochs", "lr"):
            if hasattr(obj, name) and getattr(obj, name) <= 0:
                fail(f"`{section}.{name}` must be positive, got {getattr(obj, name)}")
        if hasattr(obj, "warmup_ratio") and not 0 <= obj.warmup_ratio < 1:
            fail(f"`{section}.warmup_ratio` must be in [0, 1), got {obj.warmup_ratio}")
        swa = getattr(obj, "swa", None)
        if swa is not None:
            if not 0 <= swa.start < 1:
                fail(f"`{section}.swa.start` is the share of the run after which weights are averaged; it must be "
                     f"in [0, 1), got {swa.start}")
            if swa.every < 1:
                fail(f"`{section}.swa.every` must be at least 1, got {swa.every}")
            if swa.lr_high <= 0:
                fail(f"`{section}.swa.lr_high` must be positive, got {swa.lr_high}")
            if swa.lr == "cyclic" and not 0 <= swa.lr_low <= swa.lr_high:
                fail(f"`{section}.swa.lr_low` must be in [0, lr_high={swa.lr_high}] for a cyclic LR, got {swa.lr_low}")
    if not 0 <= cfg.data.holdout < 1:
        fail(f"`data.holdout` is the share of training examples held out; it must be in [0, 1), got {cfg.data.holdout}")
    noise = cfg.data.label_noise
    if noise is not None:
        if not 0 <= noise.rate <= 1:
            fail(f"`data.label_noise.rate` must be in [0, 1], got {noise.rate}")
        if noise.flip is not None and noise.kind != "asymmetric":
            fail("`data.label_noise.flip` maps classes for `kind: asymmetric` only; drop it or set kind: asymmetric")
    validate_loss_terms(cfg.losses, source)
    _validate_augment(cfg, fail)
    for i, stage in enumerate(cfg.schedule):
        key = f"schedule[{i}]"
        if (stage.epochs is None) == (stage.steps is None):
            fail(f"`{key}` ({stage.name}) needs exactly one of `epochs` or `steps`")
        if (stage.epochs is not None and stage.epochs <= 0) or (stage.steps is not None and stage.steps < 1):
            fail(f"`{key}` ({stage.name}) must last a positive number of epochs or steps")
        for term in stage.losses:
            if term not in cfg.losses:
                fail(f"`{key}.losses.{term}` is not a term in `losses` (known: {', '.join(cfg.losses)})")
        if stage.losses and not any(w > 0 for w in stage.losses.values()):
            fail(f"`{key}.losses` ({stage.name}) turns every term off; give at least one a positive weight")
        if stage.layers is not None:
            if not stage.layers:
                fail(f"`{key}.layers` ({stage.name}) is empty; list student layers, or null for all mapped layers")
            if stage.per_layer is not None:
                fail(f"`{key}` ({stage.name}) sets both `layers` and `per_layer`; per_layer chooses the layers itself")
            for j, layer in enumerate(stage.layers):
                if layer < 1:
                    fail(f"`{key}.layers[{j}]` must be a 1-based student layer, got {layer}")
        if stage.teacher is not None and cfg.teacher.cache is not None:
            fail(f"`{key}.teacher` ({stage.name}) switches teachers, but `teacher.cache` holds one teacher's "
                 "outputs; distil such a schedule from the online teachers (drop teacher.cache)")
        if stage.keep_best and cfg.training.swa is not None:
            fail(f"`{key}.keep_best` ({stage.name}) rewinds the student to an earlier evaluation, which the running "
                 "SWA average (`training.swa`) cannot follow; use one of them")
        if stage.keep_best and stage.per_layer is not None:
            fail(f"`{key}` ({stage.name}) sets both `keep_best` and `per_layer`; keep the best weights of a "
                 "single stage (split the per-layer stages out, or drop keep_best)")
        if stage.plateau is not None:
            for name in ("every", "patience", "batches"):
                if getattr(stage.plateau, name) < 1:
                    fail(f"`{key}.plateau.{name}` must be at least 1, got {getattr(stage.plateau, name)}")
            if stage.plateau.min_delta < 0:
                fail(f"`{key}.plateau.min_delta` must be non-negative, got {stage.plateau.min_delta}")
    if cfg.layer_map is not None:
        if not cfg.layer_map:
            fail("`layer_map` is empty; list one teacher layer per student layer, or null for the default")
        for i, layer in enumerate(cfg.layer_map):
            if layer < 1:
                fail(f"`layer_map[{i}]` must be a 1-based teacher layer, got {layer}")
        n_student = student.layers if student.layers is not None else (
            len(student.teacher_layers) if student.teacher_layers else None
        )
        if student.init_from_teacher and n_student is not None and len(cfg.layer_map) != n_student:
            fail(
                f"`layer_map` lists {len(cfg.layer_map)} teacher layers but the student has {n_student} layers; "
                "give one teacher layer per student layer"
            )
    for section in ("training", "finetune"):
        if getattr(cfg, section).attention_images < 0:
            fail(f"`{section}.attention_images` must be 0 (off) or more, got {getattr(cfg, section).attention_images}")


def _validate_augment(cfg: ExperimentConfig, fail) -> None:
    """`data.augment` (Glitter's candidate pool) and the terms that read it go together."""
    from dskd.losses import LOSS_REGISTRY, term_type

    readers = [name for name, spec in cfg.losses.items()
               if getattr(LOSS_REGISTRY[term_type(name, spec)], "augments", False)]
    if cfg.data.augment is None and readers:
        fail(f"`losses.{readers[0]}` distils on augmented candidates; set `data.augment` to a pool written by "
             "`dskd augment --config C --output DIR`")
    if cfg.data.augment is not None and not readers:
        fail("`data.augment` is set but no loss term reads augmented candidates; add `glitter` to `losses` or "
             "drop `data.augment`")


def _validate_kronecker(student: StudentConfig, fail) -> None:
    """Shapes and layers of `student.kronecker`; divisibility by the model's sizes is checked when
    the student is built (or here already, for a student built from `student.arch`)."""
    spec, key = student.kronecker, "student.kronecker"
    kinds = ("attention", "intermediate", "output", "embeddings")
    if all(getattr(spec, kind) is None for kind in kinds):
        fail(f"`{key}` compresses nothing; give the factor shape [m2, n2] of at least one of "
             + ", ".join(f"`{key}.{kind}`" for kind in kinds))
    for kind in kinds:
        shape = getattr(spec, kind)
        if shape is not None and (len(shape) != 2 or min(shape) < 1):
            fail(f"`{key}.{kind}` must be the shape [m2, n2] of the factor B (two positive integers), got {shape}")
    if spec.layers is not None:
        if not spec.layers or min(spec.layers) < 1:
            fail(f"`{key}.layers` lists 1-based student layers to factor (null: all), got {spec.layers}")
        depth = student.arch.layers if student.arch is not None else (
            len(student.teacher_layers) if student.teacher_layers else student.layers)
        if depth is not None and max(spec.layers) > depth:
            fail(f"`{key}.layers` names layer {max(spec.layers)}, but the student has {depth} layers")
    arch = student.arch
    if arch is not None:
        sizes = {"attention": (arch.hidden, arch.hidden), "intermediate": (arch.intermediate, arch.hidden),
                 "output": (arch.hidden, arch.intermediate)}
        for kind, (m, n) in sizes.items():
            shape = getattr(spec, kind)
            if shape is not None and (m % shape[0] or n % shape[1]):
                fail(f"`{key}.{kind}` is {shape}, which does not divide the [{m}, {n}] weights it factors "
                     f"([out, in]: m2 must divide {m} and n2 must divide {n})")
        if spec.embeddings is not None and arch.hidden % spec.embeddings[1]:
            fail(f"`{key}.embeddings` is {spec.embeddings}: {spec.embeddings[1]} does not divide the hidden size "
                 f"{arch.hidden} of the word embeddings")


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
