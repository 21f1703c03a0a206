"""``dskd cache-teacher``: run the teacher once over train and dev (and Glitter's candidates),
every rank its shard, into the format of ``dskd.teacher.cache``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dskd import data, models
from dskd.config import check_trained_teacher
from dskd.errors import DskdError
from dskd.losses import mapped_pairs, spec_for
from dskd.methods import glitter
from dskd.models.capture import QKCapture
from dskd.teacher.cache import AUGMENT, CacheSpec, identity_for, storage_dtype, teacher_fingerprint, write
from dskd.teacher.online import TeacherSide, load_teacher
from dskd.training import engine as eng


def cache_teacher(cfg, out: Path, deepspeed_path: str | None, dtype: str | None, batch_size: int | None,
                  overwrite: bool, argv: list[str]) -> dict:
    """``dskd cache-teacher``: run the teacher once over train and dev, every rank its shard."""
    check_trained_teacher(cfg, "cache-teacher")
    eng.init_distributed()
    training = cfg.training
    ds_config, _ = eng.load_ds_config(deepspeed_path or training.deepspeed, training)
    eng.check_precision_supported(ds_config, deepspeed_path or training.deepspeed)
    compute = eng.run_dtype(ds_config)
    store = storage_dtype(dtype or str(compute).replace("torch.", ""))
    batch_size = 2 * training.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise DskdError(f"--batch-size must be at least 1, got {batch_size}")
    task = data.get_task(cfg.data.task)
    if cfg.teacher.path is None and cfg.teacher.arch is None:
        raise DskdError("`dskd cache-teacher` runs the teacher: set `teacher.path` or `teacher.arch`")
    tokenizer = models.load_tokenizer(cfg.teacher)
    fingerprints: dict = {}
    train_set, dev_set = data.load_data(cfg, task, tokenizer, fingerprints)
    splits, specs = {"train": train_set, "dev": dev_set}, {}
    candidates = glitter.open_candidates(cfg, task, tokenizer, fingerprints)  # adds the pool to the identity
    if candidates is not None:
        splits[AUGMENT], specs[AUGMENT] = candidates.view, CacheSpec(("logits",), ())
    model = load_teacher(cfg, task, tokenizer)
    init_layers, n_student = models.student_layer_plan(cfg.student, model.config.num_hidden_layers)
    pairs = mapped_pairs(cfg, cfg.losses, init_layers, n_student, model.config.num_hidden_layers)
    spec = spec_for(cfg.losses, pairs)
    identity = identity_for(cfg, tokenizer, fingerprints, teacher_fingerprint(cfg.teacher, cfg.seed))
    # num_labels is implied by id2label in the JSON, and a family may name its geometry otherwise
    # (DistilBERT: dim, n_heads, n_layers); the reader wants them spelled out.
    geometry = ("num_labels", "hidden_size", "num_attention_heads", "num_hidden_layers")
    teacher_config = {**json.loads(model.config.to_json_string()),
                      **{name: getattr(model.config, name) for name in geometry}}
    model = models.freeze(model, compute, eng.device())
    capture = QKCapture(model, list(spec.layers), "teacher") if "attention_qk" in spec.fields else None
    layout = {"fields": list(spec.fields), "layers": list(spec.layers), "dtype": store,
              "compute_dtype": str(compute).replace("torch.", ""), "world_size": eng.world_size(),
              "batch_size": batch_size}
    if candidates is not None:
        layout[AUGMENT] = {"fields": ["logits"], "candidates_per_example": candidates.n, "key": "candidate id"}
    about = {"teacher_path": cfg.teacher.path, "data_path": cfg.data.path, "augment_path": cfg.data.augment,
             "command": argv}
    def log(*parts) -> None:  # progress goes to stderr, as the trainer's log lines do
        if eng.rank() == 0:
            print(*parts, file=sys.stderr, flush=True)

    return write(out, identity, layout, about, splits, TeacherSide(model, capture), spec, batch_size, tokenizer,
                 teacher_config, overwrite, log, specs=specs)
