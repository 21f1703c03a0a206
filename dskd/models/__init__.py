"""Teacher and student models.

The teacher is loaded (or built from config), frozen (``eval()``, no gradients), cast
to the run's dtype and kept outside the DeepSpeed engine: it never enters DDP, ZeRO
partitioning or optimizer state. The student is built from config or initialised from
chosen teacher layers (embeddings and head copied too).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
from torch import nn

from dskd.config import ArchConfig, StudentConfig, TeacherConfig, resolve_path
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


def every_kth_layer(teacher_layers: int, student_layers: int) -> list[int]:
    """1-based teacher layers spaced evenly and ending at the top (12 -> 6: 2, 4, ..., 12)."""
    if not 1 <= student_layers <= teacher_layers:
        raise DskdError(
            f"`student.layers` is {student_layers}, but a student initialised from the teacher can have "
            f"1 to {teacher_layers} layers (the teacher has {teacher_layers})"
        )
    step = teacher_layers / student_layers
    return [int(math.floor(step * (i + 1) + 0.5)) for i in range(student_layers)]


def resolve_layer_map(
    layer_map: list[int] | None, init_layers: list[int], n_student: int, n_teacher: int
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based, checked against both models."""
    if layer_map is None:
        layer_map = list(init_layers) if init_layers else every_kth_layer(n_teacher, min(n_student, n_teacher))
        if len(layer_map) < n_student:
            raise DskdError(
                f"the student has {n_student} layers and the teacher only {n_teacher}; "
                "set `layer_map` to choose a teacher layer for each student layer"
            )
    if len(layer_map) != n_student:
        raise DskdError(
            f"`layer_map` lists {len(layer_map)} teacher layers but the student has {n_student} layers; "
            "give one teacher layer per student layer"
        )
    for i, layer in enumerate(layer_map):
        if not 1 <= layer <= n_teacher:
            raise DskdError(
                f"`layer_map[{i}]` is {layer}, out of range: the teacher has {n_teacher} layers, numbered 1 to {n_teacher}"
            )
    return [(k + 1, t) for k, t in enumerate(layer_map)]


def copied_layers(cfg: StudentConfig, n_teacher: int) -> list[int]:
    """The 1-based teacher layers a student initialised from the teacher copies."""
    if cfg.teacher_layers is None:
        return every_kth_layer(n_teacher, cfg.layers)
    for i, layer in enumerate(cfg.teacher_layers):
        if not 1 <= layer <= n_teacher:
            raise DskdError(
                f"`student.teacher_layers[{i}]` is {layer}, out of range: the teacher has {n_teacher} "
                f"layers, numbered 1 to {n_teacher}"
            )
    return list(cfg.teacher_layers)


def student_layer_plan(cfg: StudentConfig, n_teacher: int) -> tuple[list[int], int]:
    """(teacher layers the student copies, student depth), known before any weights are loaded."""
    if cfg.init_from_teacher:
        layers = copied_layers(cfg, n_teacher)
        return layers, len(layers)
    return [], cfg.arch.layers


def _student_keys(student: nn.Module, teacher_keys, layers: list[int]) -> dict[str, str]:
    """Student state-dict key -> the teacher key it is copied from."""
    prefix = f"{student.base_model_prefix}.encoder.layer."
    if not any(k.startswith(prefix) for k in teacher_keys):
        raise DskdError(
            f"cannot copy teacher layers: the teacher has no `{prefix}N` blocks; "
            "initialising from teacher layers supports BERT-style encoders (BERT, RoBERTa, ...). "
            "Set `student.init_from_teacher: false` and `student.arch` instead"
        )
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    mapping = {}
    for key in student.state_dict():
        match = pattern.match(key)
        if match:
            mapping[key] = f"{prefix}{layers[int(match.group(1))] - 1}.{match.group(2)}"
        elif key in teacher_keys:
            mapping[key] = key
    return mapping


def _shallow_copy_of(config, layers: list[int]) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config.num_hidden_layers = len(layers)
    return AutoModelForSequenceClassification.from_config(config)


def _load_student_state(student: nn.Module, state: dict) -> nn.Module:
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DskdError(f"the student cannot take the teacher's weights: {exc}") from None
    return student.float()


def student_from_teacher(teacher: nn.Module, cfg: StudentConfig) -> tuple[nn.Module, list[int]]:
    """Copy embeddings, the chosen encoder layers and the head of ``teacher`` into a shallower model."""
    layers = copied_layers(cfg, teacher.config.num_hidden_layers)
    student = _shallow_copy_of(teacher.config, layers)
    source = teacher.state_dict()
    mapping = _student_keys(student, source.keys(), layers)
    return _load_student_state(student, {k: source[t] for k, t in mapping.items()}), layers


def safetensors_files(source: str) -> dict[str, Path] | None:
    """Tensor name -> the .safetensors file holding it, for a local model folder (None otherwise)."""
    folder = Path(source)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    return None


def student_from_teacher_files(path: str, cfg: StudentConfig, num_labels: int):
    """Like :func:`student_from_teacher`, reading only the copied tensors from the teacher's
    safetensors files (a cached run never holds the whole teacher). None when the
    folder has no safetensors weights or lacks a tensor, so the caller loads the model."""
    from safetensors import safe_open

    source = resolve_model_path(path)
    files = safetensors_files(source)
    if files is None:
        return None
    config = pretrained_config(path, num_labels)
    layers = copied_layers(cfg, config.num_hidden_layers)
    student = _shallow_copy_of(config, layers)
    mapping = _student_keys(student, files.keys(), layers)
    if set(mapping) != set(student.state_dict()):
        return None
    state = {}
    by_file: dict[Path, list[str]] = {}
    for key, name in mapping.items():
        by_file.setdefault(files[name], []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                state[key] = f.get_tensor(mapping[key])
    return _load_student_state(student, state), layers


def build_student(cfg: StudentConfig, teacher: nn.Module, num_labels: int, pad_token_id: int, seed: int):
    """The student and the teacher layers it was initialised from (empty when built from config)."""
    if cfg.init_from_teacher:
        student, layers = student_from_teacher(teacher, cfg)
    else:
        vocab = teacher.config.vocab_size
        student, layers = build_from_arch(cfg.arch, vocab, num_labels, pad_token_id, seed + 1, "student.arch"), []
    return student, layers


def register_model_types() -> None:
    """Register dskd's own model classes (KroneckerBERT) with transformers' Auto classes, so
    that a folder whose config names them loads like any other."""
    import dskd.models.kronecker  # noqa: F401  (registers on import)
