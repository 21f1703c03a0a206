"""Loading and building models: tokenizers, models from a folder, the hub or ``arch``, the
frozen teacher (``eval()``, no gradients, the run's dtype, outside the DeepSpeed engine), and
the inputs and outputs a forward pass takes and gives."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dskd.config import ArchConfig, TeacherConfig, resolve_path
from dskd.errors import DskdError


def resolve_model_path(path: str) -> str:
    """A dskd run folder stands for the model it exported (``<run>/model``)."""
    p = Path(resolve_path(path))
    if (p / "model" / "config.json").is_file():
        return str(p / "model")
    return str(p)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists()


def load_tokenizer(cfg: TeacherConfig, key: str | None = None):
    """The tokenizer of ``cfg`` (``teacher.tokenizer``, else ``teacher.path``), padding on the right:
    the capture hooks, the losses' masks and the teacher cache's packing read real tokens first."""
    tokenizer = _load_tokenizer(cfg, key)
    tokenizer.padding_side = "right"
    return tokenizer


def _load_tokenizer(cfg: TeacherConfig, key: str | None):
    from transformers import AutoTokenizer, BertTokenizerFast

    key = key or ("teacher.tokenizer" if cfg.tokenizer else "teacher.path")
    source = resolve_model_path(cfg.tokenizer or cfg.path)
    p = Path(source)
    if _looks_local(source) and not p.exists():
        raise DskdError(f"`{key}` points to {source}, which does not exist; give a tokenizer folder or vocab.txt")
    # A bare WordPiece vocabulary (a vocab.txt, or a folder holding only one).
    # transformers 5 ignores `vocab_file=`, giving a 5-token vocabulary; `vocab=` works.
    if p.is_file() and p.name.endswith(".txt"):
        return BertTokenizerFast(vocab=str(p))
    if p.is_dir() and (p / "vocab.txt").is_file() and not (p / "tokenizer_config.json").is_file():
        return BertTokenizerFast(vocab=str(p / "vocab.txt"))
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises many types for a bad folder or hub name
        raise DskdError(f"`{key}`: could not load a tokenizer from {source}: {exc}") from None


def arch_config(arch: ArchConfig, vocab_size: int, num_labels: int, pad_token_id: int, key: str):
    """The Hugging Face config of a model built from ``arch``."""
    from transformers import AutoConfig

    if arch.hidden % arch.heads:
        raise DskdError(f"`{key}.hidden` ({arch.hidden}) must be divisible by `{key}.heads` ({arch.heads})")
    for name in ("layers", "hidden", "heads", "intermediate"):
        if getattr(arch, name) < 1:
            raise DskdError(f"`{key}.{name}` must be at least 1, got {getattr(arch, name)}")
    extra = {}
    max_position = arch.max_position
    if arch.model_type == "roberta":
        # RoBERTa's positions start after the padding index.
        max_position += pad_token_id + 1
        extra["type_vocab_size"] = 1
    return AutoConfig.for_model(
        arch.model_type,
        vocab_size=vocab_size,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        intermediate_size=arch.intermediate,
        max_position_embeddings=max_position,
        hidden_dropout_prob=arch.dropout,
        attention_probs_dropout_prob=arch.dropout,
        num_labels=num_labels,
        pad_token_id=pad_token_id,
        **extra,
    )


def build_from_arch(arch: ArchConfig, vocab_size: int, num_labels: int, pad_token_id: int, seed: int, key: str):
    """A randomly initialised sequence classifier of the given shape (deterministic in ``seed``)."""
    from transformers import AutoModelForSequenceClassification

    config = arch_config(arch, vocab_size, num_labels, pad_token_id, key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(config)


def pretrained_config(path: str, num_labels: int, key: str = "teacher.path"):
    """A model folder's config, checked against the task, without loading weights."""
    from transformers import AutoConfig

    register_model_types()

    source = resolve_model_path(path)
    if _looks_local(source) and not Path(source).exists():
        raise DskdError(f"`{key}` points to {source}, which does not exist; give a model folder, hub name or dskd run")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise DskdError(f"`{key}`: could not read a model config from {source}: {exc}") from None
    if config.num_labels != num_labels:
        raise DskdError(
            f"`{key}` ({source}) has {config.num_labels} output labels but the task has {num_labels}; "
            "distil from a teacher fine-tuned on this task (dskd finetune --config ... --output DIR, then teacher.path: DIR)"
        )
    return config


def load_pretrained(path: str, num_labels: int, for_finetune: bool, key: str = "teacher.path"):
    """Load a sequence classifier; for distillation its head must already match the task."""
    from transformers import AutoModelForSequenceClassification

    register_model_types()

    source = resolve_model_path(path)
    if not for_finetune:
        pretrained_config(path, num_labels, key)
    elif _looks_local(source) and not Path(source).exists():
        raise DskdError(f"`{key}` points to {source}, which does not exist; give a model folder, hub name or dskd run")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, ignore_mismatched_sizes=for_finetune, output_loading_info=True
        )
    except Exception as exc:
        raise DskdError(f"`{key}`: could not load a model from {source}: {exc}") from None
    fresh = [k for k in info.get("missing_keys", []) if "classifier" in k or "score" in k]
    if not for_finetune and fresh:
        raise DskdError(
            f"`{key}` ({source}) has no trained classification head ({', '.join(sorted(fresh))} newly "
            "initialised); fine-tune it first with `dskd finetune`"
        )
    return model


def freeze(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def teacher_outputs(teacher: nn.Module, batch: dict, needs: frozenset[str], capture=None, layers=()) -> dict:
    """Run the frozen teacher without autograd, asking only for what the losses need.

    ``layers``: the teacher layers (1-based, aligned with the student's active pairs)
    whose [CLS] vectors (``cls``) and Q/K (``attention_qk``, via ``capture``) are kept.
    """
    from dskd.models.capture import forward_with_layers

    with torch.no_grad():
        return forward_with_layers(teacher, model_inputs(batch), needs, capture, list(layers))


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


# ------------------------------------------------------------------------ students


def register_model_types() -> None:
    """Register dskd's own model classes (KroneckerBERT) with transformers' Auto classes, so
    that a folder whose config names them loads like any other."""
    import dskd.models.kronecker  # noqa: F401  (registers on import)
