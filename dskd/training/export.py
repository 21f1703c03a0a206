"""Turn a run's DeepSpeed checkpoint into a plain Hugging Face model folder.

The checkpoint holds the engine's whole module (``model.*`` plus loss-term parameters
such as projections) in whatever ZeRO layout trained it. Export consolidates it to
fp32 (or takes the weights a method exports instead, e.g. a weight average the checkpoint
holds), keeps only the trained model, and writes it with its tokenizer so that the task's
Auto class (``AutoModelForSequenceClassification`` for GLUE) loads it anywhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import transformers

from dskd import data, models
from dskd.errors import DskdError
from dskd.methods import exported_state
from dskd.training import checkpoint
from dskd.training.run_dir import MODEL_CONFIG_DIR, RUN_FILE

MODEL_PREFIX = "model."


def export_run(run_dir: Path, out: Path, tag: str | None = None, verify: bool = True) -> Path:
    """``verify``: check the checkpoint against its manifest first (the newest that passes when
    no ``tag`` is given); a run exporting the checkpoint it has just written skips it."""
    models.register_model_types()  # model_config/ may name one of dskd's own model classes
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / RUN_FILE).is_file():
        raise DskdError(f"--run {run_dir} is not a dskd run folder (no {RUN_FILE}); pass the --output of a run")
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
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise DskdError(f"--out {out} exists and is not a model folder; choose an empty or new folder")
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
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(run_dir / MODEL_CONFIG_DIR).save_pretrained(out)
    return out
