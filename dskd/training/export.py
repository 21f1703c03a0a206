"""Turn a run's DeepSpeed checkpoint into a plain Hugging Face model folder.

The checkpoint holds the engine's whole module (``model.*`` plus loss-term parameters
such as projections) in whatever ZeRO layout trained it. Export consolidates it to
fp32 (or takes the weights a method exports instead, e.g. a weight average the checkpoint
holds), keeps only the trained model, and writes it with its tokenizer so that the task's
Auto class (``AutoModelForSequenceClassification`` for GLUE) and ``transformers.pipeline`` load
it anywhere: the config names the task's classes (``id2label``), the tokenizer truncates at the
model's positions and keeps no per-call or machine-local state, a ``README.md`` model card says
what the model is and how it was made, and every file is readable as the umask allows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import transformers

from dskd import data, models
from dskd.errors import DskdError
from dskd.methods import exported_state
from dskd.runtime.files import follow_umask
from dskd.training import checkpoint, model_card
from dskd.training.run_dir import MODEL_CONFIG_DIR, RUN_FILE

MODEL_PREFIX = "model."
CARD_FILE = "README.md"
# tokenizer_config.json keys that record how the tokenizer was last called or loaded, not what
# it is: a stale max_length or padding silently changes a user's call; local_files_only and a
# local name_or_path make the folder fail (or look for files) on another machine.
PER_CALL_KEYS = ("max_length", "stride", "truncation_strategy", "truncation", "padding", "padding_strategy",
                 "pad_to_multiple_of", "return_tensors", "local_files_only", "is_local", "name_or_path",
                 "_name_or_path", "cache_dir", "force_download", "revision", "subfolder", "token", "_commit_hash")


def export_run(run_dir: Path, out: Path, tag: str | None = None, verify: bool = True,
               final_metrics: dict | None = None, overwrite: bool = False) -> Path:
    """``overwrite``: replace the model folder ``out`` holds (otherwise refused, as runs are).
    ``verify``: check the checkpoint against its manifest first (the newest that passes when
    no ``tag`` is given); a run exporting the checkpoint it has just written skips it.
    ``final_metrics``: the run's result, when the run exports its final model before writing
    ``metrics.json`` (the model card then calls it final and shows them)."""
    models.register_model_types()  # model_config/ may name one of dskd's own model classes
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / RUN_FILE).is_file():
        raise DskdError(f"--run {run_dir} is not a dskd run folder (no {RUN_FILE}); pass the --output of a run")
    check_out(out, overwrite)
    ckpt_dir = run_dir / "checkpoints"
    if tag is None and verify:
        tag, skipped = checkpoint.newest_verified(ckpt_dir)
        for line in skipped:
            print(f"[export] {line}", file=sys.stderr)
    tag = tag or checkpoint.latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag / checkpoint.COMPLETE).is_file():
        raise DskdError(f"--run {run_dir}: no complete checkpoint{' ' + tag if tag else ''} in {ckpt_dir}")
    problem = checkpoint.verify(ckpt_dir / tag) if verify else None
    if problem:
        raise DskdError(f"--run {run_dir}: checkpoint {tag} does not match its manifest ({problem}); export an "
                        f"older one with --tag (complete: {', '.join(checkpoint.complete_tags(ckpt_dir))})")
    info = json.loads((run_dir / RUN_FILE).read_text())
    # A method may make other weights the result (a weight average), not the last trained ones.
    state = exported_state(ckpt_dir / tag) or checkpoint.consolidated_state_dict(ckpt_dir, tag,
                                                                                 int(info.get("zero_stage", 0)))
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}

    config = transformers.AutoConfig.from_pretrained(run_dir / MODEL_CONFIG_DIR)
    # A run.json without `task` predates it; every run then was GLUE classification or regression.
    model_class = info.get("model_class") or (
        data.get_task(info["task"]).model_class if info.get("task") else data.TaskSpec.model_class)
    model = getattr(transformers, model_class).from_config(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise DskdError(
            f"checkpoint {ckpt_dir / tag} does not match the model config in {run_dir / MODEL_CONFIG_DIR} "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    if model_class == models.SEQUENCE_CLASSIFIER and info.get("task") in data.GLUE_TASKS:
        name_classes(model.config, data.get_task(info["task"]))
    # Written beside --out and renamed into place: a failed export leaves the old folder as it was,
    # and a replaced one keeps no stale file of the model it held.
    staging = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    max_tokens = max_positions(model)
    save_tokenizer(run_dir / MODEL_CONFIG_DIR, staging, max_tokens)
    (staging / CARD_FILE).write_text(model_card.render(run_dir, out, tag, model, info, max_tokens, final_metrics))
    follow_umask(staging)
    if out.exists() and any(out.iterdir()):
        replaced = out.with_name(f".{out.name}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
        os.replace(staging, out)
        shutil.rmtree(replaced)
    else:
        os.replace(staging, out)  # onto an empty folder too
    return out


def check_out(out: Path, overwrite: bool) -> None:
    """Before anything heavy: ``--out`` is new, empty, or (with ``overwrite``) a model folder."""
    if out.exists() and not out.is_dir():
        raise DskdError(f"--out {out} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / "config.json").is_file():
        raise DskdError(f"--out {out} exists and is not a model folder; choose an empty or new folder")
    if not overwrite:
        raise DskdError(f"--out {out} already holds an exported model; replace it with --overwrite, "
                        "or choose another folder")


def name_classes(config, task: data.TaskSpec) -> None:
    """id2label/label2id from the task's class names (what pipelines print), and the problem type
    (a regression's one output is a score: no sigmoid on it)."""
    config.id2label = dict(enumerate(task.class_names))
    config.label2id = {name: i for i, name in enumerate(task.class_names)}
    config.problem_type = "regression" if task.is_regression else "single_label_classification"


def max_positions(model) -> int | None:
    """How many tokens the model takes: its position table, less RoBERTa's offset (positions
    start after the padding index, so 514 rows hold 512 tokens); None if it has no such table."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return None
    padding_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    return positions - (padding_idx + 1 if padding_idx is not None else 0)


def save_tokenizer(source: Path, out: Path, positions: int | None) -> None:
    """The run's tokenizer, made portable: ``model_max_length`` is the model's positions (a vocabulary
    without a tokenizer_config.json gives 1e30, and `truncation=True` then overruns the position
    table), with no truncation or padding of a past call and no per-call or local-load keys."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if positions is not None and (not tokenizer.model_max_length or tokenizer.model_max_length > positions):
        tokenizer.model_max_length = positions
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # tokenizer.json keeps the last call's truncation/padding
        backend.no_truncation()
        backend.no_padding()
    for key in PER_CALL_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    if path.is_file():  # keys save_pretrained adds from the tokenizer's attributes
        saved = json.loads(path.read_text())
        kept = {k: v for k, v in saved.items() if k not in PER_CALL_KEYS}
        if kept != saved:
            path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")
