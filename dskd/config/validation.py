"""Cross-field checks of an experiment that types alone cannot express."""

from __future__ import annotations

from dskd.config.schema import ExperimentConfig, StudentConfig
from dskd.errors import DskdError

MAX_SEED = 2**32 - 1 - 4096  # room for `seed + rank` and the per-purpose offsets added to it


def validate(cfg: ExperimentConfig, source: str) -> None:
    """Cross-field checks that types alone cannot express."""

    def fail(message: str) -> None:
        raise DskdError(f"{source}: {message}")

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
    if student.init is not None:
        _validate_student_init(student, fail)
    elif not student.init_from_teacher and student.arch is None:
        fail("`student.arch` is required when `student.init_from_teacher` is false")
    if student.init is None and student.init_from_teacher and student.arch is not None:
        fail(
            "`student.arch` cannot be combined with `student.init_from_teacher: true`: a student initialised "
            "from teacher layers has the teacher's width; set `student.layers` or `student.teacher_layers`"
        )
    if student.init is None and student.init_from_teacher and student.layers is None \
            and student.teacher_layers is None:
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
        for name in ("max_length", "batch_size", "grad_accum", "keep_checkpoints", "group_by_length_megabatch"):
            if hasattr(obj, name) and getattr(obj, name) < 1:
                fail(f"`{section}.{name}` must be at least 1, got {getattr(obj, name)}")
        if getattr(obj, "global_batch_size", None) is not None:
            if obj.global_batch_size < 1:
                fail(f"`{section}.global_batch_size` must be at least 1 (or null), got {obj.global_batch_size}")
            if obj.grad_accum != 1:
                fail(f"`{section}.global_batch_size` derives `{section}.grad_accum` from the number of ranks; "
                     f"set one of them, not both (grad_accum is {obj.grad_accum})")
            if obj.global_batch_size % obj.batch_size:
                fail(f"`{section}.global_batch_size` ({obj.global_batch_size}) must be a multiple of "
                     f"`{section}.batch_size` ({obj.batch_size}), the examples of one rank's micro-step")
        for name in ("train_limit", "dev_limit", "halt_after_steps", "max_steps"):
            value = getattr(obj, name, None)
            if value is not None and value < 1:
                fail(f"`{section}.{name}` must be at least 1 (or null), got {value}")
        for name in ("epochs", "lr"):
            if hasattr(obj, name) and getattr(obj, name) <= 0:
                fail(f"`{section}.{name}` must be positive, got {getattr(obj, name)}")
        for name in ("weight_decay", "max_grad_norm", "eval_every", "save_every", "log_every_seconds"):
            if hasattr(obj, name) and getattr(obj, name) < 0:
                meaning = {"max_grad_norm": " (0 turns clipping off)", "eval_every": " (0: every epoch)",
                           "save_every": " (0: every epoch)",
                           "log_every_seconds": " (0: only every log_every steps)"}.get(name, "")
                fail(f"`{section}.{name}` must be 0 or more{meaning}, got {getattr(obj, name)}")
        if hasattr(obj, "log_every") and obj.log_every < 1:
            fail(f"`{section}.log_every` must be at least 1 (optimizer steps between log lines), got {obj.log_every}")
        if getattr(obj, "warmup_steps", None) is not None and obj.warmup_steps < 0:
            fail(f"`{section}.warmup_steps` must be 0 or more (or null), got {obj.warmup_steps}")
        if getattr(obj, "max_steps", None) is not None and section == "training" and cfg.schedule:
            fail("`training.max_steps` sets the length of a run without a schedule; with `schedule`, give each "
                 "stage its `steps` instead")
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
    for key, seed in (("seed", cfg.seed), ("data.label_noise.seed", getattr(cfg.data.label_noise, "seed", 0))):
        if not 0 <= seed <= MAX_SEED:  # numpy's generators take seeds in [0, 2**32); ranks add their rank
            fail(f"`{key}` must be in [0, {MAX_SEED}], got {seed}")
    for key, arch in (("teacher.arch", cfg.teacher.arch), ("student.arch", student.arch)):
        if arch is not None:
            _validate_arch(arch, key, fail)
    if cfg.data.corpus is not None:
        _validate_corpus(cfg, fail)
    if not 0 <= cfg.data.holdout < 1:
        fail(f"`data.holdout` is the share of training examples held out; it must be in [0, 1), got {cfg.data.holdout}")
    _validate_unlabeled(cfg.data, fail)
    noise = cfg.data.label_noise
    if noise is not None:
        if not 0 <= noise.rate <= 1:
            fail(f"`data.label_noise.rate` must be in [0, 1], got {noise.rate}")
        if noise.flip is not None and noise.kind != "asymmetric":
            fail("`data.label_noise.flip` maps classes for `kind: asymmetric` only; drop it or set kind: asymmetric")
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


def _validate_arch(arch, key: str, fail) -> None:
    for name in ("layers", "hidden", "heads", "intermediate", "max_position"):
        if getattr(arch, name) < 1:
            fail(f"`{key}.{name}` must be at least 1, got {getattr(arch, name)}")
    if arch.hidden % arch.heads:
        fail(f"`{key}.hidden` ({arch.hidden}) must be a multiple of `{key}.heads` ({arch.heads})")
    if not 0 <= arch.dropout < 1:
        fail(f"`{key}.dropout` is a probability; it must be in [0, 1), got {arch.dropout}")
    if arch.embedding_size is not None:
        if arch.model_type not in ("albert", "electra"):
            fail(f"`{key}.embedding_size` is for ALBERT and ELECTRA, whose embeddings are projected to the hidden "
                 f"width; a {arch.model_type} embeds at `{key}.hidden`: drop it")
        if arch.embedding_size < 1:
            fail(f"`{key}.embedding_size` must be at least 1, got {arch.embedding_size}")


def _validate_student_init(student: StudentConfig, fail) -> None:
    """`student.init` gives the student's weights and shape; keys that would give them too are refused."""
    for name in ("arch", "layers", "teacher_layers"):
        if getattr(student, name) is not None:
            fail(f"`student.{name}` cannot be combined with `student.init` ({student.init}), which gives the "
                 f"student's shape and weights; drop `student.{name}`")


def _validate_corpus(cfg: ExperimentConfig, fail) -> None:
    corpus = cfg.data.corpus
    if not corpus.files and corpus.dataset is None:
        fail("`data.corpus.files` is empty; list .txt, .jsonl or .parquet files or folders of them, "
             "e.g. [../shared/data/corpus/wikitext-2] (or name a hub dataset in `data.corpus.dataset`)")
    if corpus.files and corpus.dataset is not None:
        fail("`data.corpus` sets both `files` and `dataset`; read one corpus (local files or a hub dataset)")
    if not 0 <= corpus.held_out < 1:
        fail(f"`data.corpus.held_out` is the share of blocks held out for evaluation; it must be in [0, 1), "
             f"got {corpus.held_out}")
    if corpus.held_out == 0:
        fail("`data.corpus.held_out` is 0, but a corpus job is evaluated on its held-out blocks; "
             "hold out a share, e.g. 0.01")
    if not 0 < corpus.mask_probability < 1:
        fail(f"`data.corpus.mask_probability` must be in (0, 1), got {corpus.mask_probability}")
    if corpus.max_blocks is not None and corpus.max_blocks < 1:
        fail(f"`data.corpus.max_blocks` must be at least 1 (or null), got {corpus.max_blocks}")
    if cfg.teacher.cache is not None:
        fail("`teacher.cache` serves GLUE jobs only: a corpus job's inputs are re-masked every epoch and its "
             "terms read every token's states, which no cache holds (docs/general.md, 'Teacher cache'); drop it")


def _validate_unlabeled(data, fail) -> None:
    if data.unlabeled_limit is not None and not data.unlabeled:
        fail("`data.unlabeled_limit` caps the unlabeled rows of `data.unlabeled`, which is off; set "
             "`data.unlabeled: true` or drop it")
    if not data.unlabeled:
        return
    if data.train_limit is None:
        fail("`data.unlabeled` trains on the rows after the first `data.train_limit` without their labels, and "
             "`data.train_limit` is null (every row is labelled); set it, e.g. data.train_limit=8000")
    if data.unlabeled_limit is not None and data.unlabeled_limit < 1:
        fail(f"`data.unlabeled_limit` must be at least 1 (or null: every row after train_limit), got "
             f"{data.unlabeled_limit}")
    for key, on in (("holdout", data.holdout > 0), ("label_noise", data.label_noise is not None)):
        if on:
            fail(f"`data.{key}` works on gold labels, which the rows `data.unlabeled` adds do not have; use one of "
                 "the two")


GLUE_KEYS = ("task", "path", "train_limit", "dev_limit", "holdout", "label_noise", "augment", "unlabeled",
             "unlabeled_limit")


def check_job_kind(raw: dict, source: str) -> None:
    """A corpus job (`data.corpus`) leaves the GLUE keys of `data` unset: set, they would say the
    run reads a task it does not read. Checked on the YAML as written, before defaults fill in."""
    section = raw.get("data")
    if not isinstance(section, dict) or section.get("corpus") is None:
        return
    given = [key for key in GLUE_KEYS if key in section]
    if given:
        raise DskdError(f"{source}: `data.{given[0]}` is a key of GLUE jobs, but `data.corpus` makes this a corpus "
                        f"job; drop {', '.join('`data.' + k + '`' for k in given)} (or drop `data.corpus`)")


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


def check_trained_teacher(cfg: ExperimentConfig, command: str) -> None:
    """``command`` learns from the teacher; one built from `teacher.arch` is random (never fine-tuned),
    which nothing but a chance-level teacher accuracy would show. It takes `teacher.random_ok: true`."""
    if cfg.teacher.path is None and cfg.teacher.arch is not None and not cfg.teacher.random_ok:
        raise DskdError(
            f"`dskd {command}` would use a randomly initialised teacher: `teacher.path` is not set, so the teacher "
            "is built from `teacher.arch` and was never trained. Set `teacher.path` to a fine-tuned run "
            "(dskd finetune --config C --output DIR, then --set teacher.path=DIR), or set `teacher.random_ok: true` "
            "to use a random teacher on purpose (smoke tests)")
