"""Turn a run's DeepSpeed checkpoint into a plain Hugging Face model folder.

The checkpoint holds the engine's whole module (``model.*`` plus loss-term parameters
such as projections) in whatever ZeRO layout trained it. Export consolidates it to
fp32 (or takes the SWA average the checkpoint holds), keeps only the trained model, and
writes it with its tokenizer so that
``AutoModelForSequenceClassification.from_pretrained(out)`` loads it anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from dskd import checkpoint
from dskd.errors import DskdError
from dskd.swa import averaged_state

MODEL_PREFIX = "model."


def export_run(run_dir: Path, out: Path, tag: str | None = None) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    import dskd.kronecker  # noqa: F401  (registers KroneckerBERT, whose config model_config/ may hold)
    from dskd.trainer import MODEL_CONFIG_DIR, RUN_FILE

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / RUN_FILE).is_file():
        raise DskdError(f"--run {run_dir} is not a dskd run folder (no {RUN_FILE}); pass the --output of a run")
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or checkpoint.latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag / checkpoint.COMPLETE).is_file():
        raise DskdError(f"--run {run_dir}: no complete checkpoint{' ' + tag if tag else ''} in {ckpt_dir}")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise DskdError(f"--out {out} exists and is not a model folder; choose an empty or new folder")
    info = json.loads((run_dir / RUN_FILE).read_text())
    # With SWA the averaged weights are the result, not the last trained ones.
    state = averaged_state(ckpt_dir / tag) or checkpoint.consolidated_state_dict(ckpt_dir, tag,
                                                                                 int(info.get("zero_stage", 0)))
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}

    config = AutoConfig.from_pretrained(run_dir / MODEL_CONFIG_DIR)
    model = AutoModelForSequenceClassification.from_config(config)
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
    AutoTokenizer.from_pretrained(run_dir / MODEL_CONFIG_DIR).save_pretrained(out)
    return out
