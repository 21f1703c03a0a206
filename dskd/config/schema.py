"""The experiment schema: one dataclass per YAML section, with defaults, and the path
resolution every section's file keys share (``pkg://``, ``pypkg://``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from dskd.errors import DskdError

PACKAGE_RESOURCES = Path(__file__).resolve().parents[1] / "resources"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


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
    # The encoder family (tests/test_families.py runs each): its transformers model type.
    model_type: Literal["bert", "roberta", "electra", "albert", "distilbert", "deberta-v2"] = "bert"
    max_position: int = 512
    dropout: float = 0.1
    # ALBERT and ELECTRA: width of the token embeddings, projected to `hidden` (null: `hidden`).
    embedding_size: Optional[int] = None


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
class CorpusConfig:
    """Raw text for task-agnostic distillation (docs/general.md): packed into blocks of
    `data.max_length` tokens; a corpus job has no labels and no GLUE task."""

    # .txt (a text unit per line), .jsonl or .parquet files, or folders of them (searched
    # recursively, in sorted order); pkg:// and pypkg:// paths work as elsewhere.
    files: list[str] = field(default_factory=list)
    # Or a Hugging Face hub dataset (when the network, or a local datasets cache, allows):
    # its name, config and split, e.g. wikitext / wikitext-103-raw-v1 / train.
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"  # the field of .jsonl/.parquet records (or dataset rows) that holds the text
    # Read the files as a stream: for corpora larger than memory. The blocks are the same.
    streaming: bool = False
    held_out: float = 0.01  # share of the blocks (the corpus's tail) evaluated on, never trained on
    max_blocks: Optional[int] = None  # keep the first N training blocks (a deterministic subsample)
    # Masked-LM terms (mlm_ce, mlm_kd): share of tokens masked, dynamically (a new mask each
    # epoch, seeded by seed, epoch and block), 80% [MASK] / 10% random / 10% kept.
    mask_probability: float = 0.15


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
    # Unlabeled transfer data: the training rows after the first `train_limit` also train, with
    # their labels removed (-100): terms that read gold labels (hard_ce) skip them, terms that
    # learn from the teacher's outputs use every row. Needs `train_limit`; `unlabeled_limit`
    # keeps the first N of those rows (null: all of them).
    unlabeled: bool = False
    unlabeled_limit: Optional[int] = None
    # Share of the training examples held out of training (a seeded choice, made before any
    # label noise, so they keep their labels): the meta batches of RW-KD.
    holdout: float = 0.0
    label_noise: Optional[LabelNoiseConfig] = None
    # Glitter: a candidate pool written by `dskd augment` (augmented copies of the training
    # examples); read by the `glitter` loss term and by `dskd cache-teacher` (split `augment`).
    augment: Optional[str] = None
    # A corpus for task-agnostic distillation (null: the GLUE task above). With it, the GLUE
    # keys (task, path, train_limit, dev_limit, holdout, label_noise, augment) must be unset.
    corpus: Optional[CorpusConfig] = None


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
    # `dskd distill`, `cache-teacher` and `train-probes` refuse a teacher built from `arch` (randomly
    # initialised, never fine-tuned) unless this is true: forgetting `teacher.path` is otherwise silent.
    random_ok: bool = False


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
    # Start from this model folder or dskd run (e.g. a general student exported after a corpus
    # job): its weights, depth and width; a task head is added, seeded. Replaces
    # init_from_teacher and arch, which must then be left unset.
    init: Optional[str] = None


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
    # Length in optimizer steps instead of epochs (a corpus job's budget); replaces `epochs`
    # when set. Without a schedule only: stages set their own length.
    max_steps: Optional[int] = None
    batch_size: int = 32  # per rank and micro-step
    grad_accum: int = 1
    # Keep the global batch (ranks x batch_size x grad_accum, examples per optimizer step) fixed
    # whatever the number of ranks: grad_accum is then derived as global_batch_size / (ranks x
    # batch_size) at launch; null: grad_accum as given, so the global batch grows with the ranks.
    global_batch_size: Optional[int] = None
    # Put examples of similar length into the same micro-step (less padding, as Hugging Face's
    # `group_by_length`): each window of `group_by_length_megabatch` optimizer steps of the
    # epoch's seeded permutation is sorted by length and cut into steps, which run in a seeded
    # random order, the longest first. The same examples per epoch as random batches, the same
    # steps on any number of ranks (resume moves freely); a no-op on a corpus. It halves an SST-2
    # run without moving the dev metric (docs/results.md): turn it on. Off by default only so
    # that the commands recorded in docs/ with random batches reproduce their tables.
    group_by_length: bool = False
    group_by_length_megabatch: int = 50
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # warm-up in optimizer steps; replaces warmup_ratio when set
    max_grad_norm: float = 1.0
    eval_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    save_every: int = 0  # optimizer steps; 0 = at the end of each epoch
    log_every: int = 10  # optimizer steps between logged losses (TensorBoard, and the log's [train] lines)
    # The training log: `bar` (a progress bar showing the current loss), `log` (a [train] line
    # with step, epoch, every loss term, lr, grad norm, throughput and ETA at each logging step),
    # or `auto`: a bar on a terminal, lines when the output goes to a file (sbatch, `> run.log`).
    progress: Literal["auto", "bar", "log"] = "auto"
    # With `log` lines: also log when this many seconds passed without a line (0: only every
    # `log_every` steps), so slow steps still show progress in a batch log.
    log_every_seconds: float = 60.0
    keep_checkpoints: int = 2
    # How a resume checks a checkpoint against its manifest: every file's SHA-256 (`full`,
    # about 1 s per GB) or only sizes and presence (`sizes`: catches truncation and deletion,
    # not flipped bytes). A checkpoint that fails is skipped for the next older one.
    checkpoint_check: Literal["full", "sizes"] = "full"
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
