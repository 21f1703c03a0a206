"""The student: which teacher layers it copies and is mapped to, and building it from the
teacher (in memory or straight from its safetensors files) or from ``student.arch``."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

from torch import nn

from dskd.config import StudentConfig
from dskd.errors import DskdError
from dskd.models import families
from dskd.models.loading import (
    SEQUENCE_CLASSIFIER, build_from_arch, load_pretrained, pretrained_config, resolve_model_path,
)


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
    prefix = families.layer_prefix(student, teacher_keys)
    if prefix is None:  # layers share weights (ALBERT): the same keys at any depth
        return {key: key for key in student.state_dict() if key in teacher_keys}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    mapping = {}
    for key in student.state_dict():
        match = pattern.match(key)
        if match:
            mapping[key] = f"{prefix}{layers[int(match.group(1))] - 1}.{match.group(2)}"
        elif key in teacher_keys:
            mapping[key] = key
    return mapping


def _shallow_copy_of(config, layers: list[int], model_class: type | None = None) -> nn.Module:
    """A model of ``config`` with ``len(layers)`` layers: of ``model_class`` (the teacher's own
    class), else a sequence classifier."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config.num_hidden_layers = len(layers)
    if model_class is not None:
        return model_class(config)
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
    student = _shallow_copy_of(teacher.config, layers, type(teacher))
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


def build_student(cfg: StudentConfig, teacher: nn.Module, num_labels: int, pad_token_id: int, seed: int,
                  model_class: str = SEQUENCE_CLASSIFIER):
    """The student and the teacher layers it was initialised from (empty when built from config
    or started from ``student.init``)."""
    if cfg.init is not None:
        return student_from_folder(cfg.init, num_labels, seed, model_class), []
    if cfg.init_from_teacher:
        student, layers = student_from_teacher(teacher, cfg)
    else:
        vocab = teacher.config.vocab_size
        student, layers = build_from_arch(cfg.arch, vocab, num_labels, pad_token_id, seed + 1, "student.arch",
                                          model_class), []
    return student, layers


def student_from_folder(path: str, num_labels: int, seed: int, model_class: str = SEQUENCE_CLASSIFIER) -> nn.Module:
    """``student.init``: a model folder or dskd run (e.g. a general student exported after a corpus
    job) with the job's head; a head the folder lacks is initialised from ``seed``, so the
    task stage of a two-stage pipeline is reproducible."""
    return load_pretrained(path, num_labels, for_finetune=True, key="student.init", model_class=model_class,
                           seed=seed + 1).float()
