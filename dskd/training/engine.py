"""DeepSpeed plumbing: process group, DeepSpeed JSON, engine.

The DeepSpeed JSON in ``ds_configs/`` chooses only the ZeRO stage and the dtype. Batch
size, accumulation, clipping, optimizer and LR schedule come from the experiment
config, so one experiment runs unchanged under every ZeRO/dtype combination; a JSON
that sets them to something else is rejected rather than silently overridden.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from dskd.config import PROJECT_ROOT, TrainingConfig
from dskd.errors import DskdError
from dskd.training import deepspeed_json
from dskd.runtime.dist import (  # noqa: F401  (the loop reads them through this module)
    barrier, device, init_distributed, is_cpu, prepare_environment, rank, world_size,
)

# Keys of the DeepSpeed JSON that dskd fills from the experiment config.
MANAGED_KEYS = {
    "train_micro_batch_size_per_gpu": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "gradient_clipping": "training.max_grad_norm",
}


def at_world_size(training: TrainingConfig, world: int, section: str = "training") -> TrainingConfig:
    """``training`` with ``grad_accum`` derived from ``global_batch_size`` for ``world`` ranks (as
    given when it is null). The global batch is ``world x batch_size x grad_accum``."""
    if training.global_batch_size is None:
        return training
    per_step = world * training.batch_size
    if training.global_batch_size % per_step:
        lower = training.global_batch_size // per_step * per_step
        hint = f"{lower} or {lower + per_step}" if lower else f"{per_step}"
        raise DskdError(
            f"`{section}.global_batch_size` {training.global_batch_size} is not a multiple of {world} rank(s) x "
            f"`{section}.batch_size` {training.batch_size} = {per_step}, so no whole `{section}.grad_accum` gives it; "
            f"set global_batch_size to a multiple of {per_step} (e.g. {hint}), or change batch_size or the ranks"
        )
    return dataclasses.replace(training, grad_accum=training.global_batch_size // per_step)


def describe_batch(training: TrainingConfig, world: int, section: str = "training") -> str:
    """The global batch and how it is made, for the run's opening line."""
    total = world * training.batch_size * training.grad_accum
    derived = f" (derived from {section}.global_batch_size)" if training.global_batch_size is not None else ""
    return (f"global batch {total} = {world} rank(s) x batch_size {training.batch_size} x grad_accum "
            f"{training.grad_accum}{derived}")


def resolve_ds_config_path(path: str) -> Path:
    """A DeepSpeed JSON given relative to the working directory or to the dskd checkout."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(PROJECT_ROOT / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = sorted(p.name for p in (PROJECT_ROOT / "ds_configs").glob("*.json"))
    raise DskdError(
        f"DeepSpeed config {path} not found (set by --deepspeed or `training.deepspeed`); "
        f"shipped configs in ds_configs/: {', '.join(shipped) or 'none'}"
    )


def _unique_keys(file: Path):
    def pairs(items: list) -> dict:
        keys = [k for k, _ in items]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise DskdError(f"{file}: key `{twice[0]}` is given twice in one object; keep one")
        return dict(items)

    return pairs


def load_ds_config(path: str, training: TrainingConfig) -> tuple[dict, Path]:
    """Read the DeepSpeed JSON and fill in what the experiment config owns."""
    file = resolve_ds_config_path(path)
    try:
        ds = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys(file))
    except UnicodeDecodeError:
        raise DskdError(f"{file}: not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DskdError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise DskdError(f"{file}: the top level must be a JSON object")
    deepspeed_json.check(ds, file)
    for key in ("optimizer", "scheduler", "train_batch_size"):
        if key in ds:
            raise DskdError(
                f"{file}: remove `{key}`; dskd builds it from the experiment config "
                "(training.lr, training.weight_decay, training.warmup_ratio, training.batch_size)"
            )
    wanted = {
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.grad_accum,
        "gradient_clipping": training.max_grad_norm,
    }
    for key, value in wanted.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise DskdError(
                f"{file}: `{key}` is {ds[key]} but `{MANAGED_KEYS[key]}` is {value}; "
                f"remove `{key}` from the JSON (or set it to \"auto\") and set it in the experiment config"
            )
        ds[key] = value
    ds.setdefault("steps_per_print", 10**9)  # dskd logs its own progress
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise DskdError(f"{file}: enable at most one of `fp16` and `bf16`")
    return ds, file


def run_dtype(ds: dict) -> torch.dtype:
    if ds.get("fp16", {}).get("enabled", False):
        return torch.float16
    if ds.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    return torch.float32


def cpu_supports_fp16() -> bool:
    # What DeepSpeed's CPU accelerator asks before refusing fp16.
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def check_precision_supported(ds: dict, file: Path) -> None:
    """Fail with our own message where DeepSpeed would raise a generic ValueError."""
    if run_dtype(ds) is not torch.float16 or not is_cpu() or cpu_supports_fp16():
        return
    raise DskdError(
        f"{file} enables fp16, which this CPU cannot train in (it needs AVX512-FP16 or AMX-FP16); "
        f"use bf16 or fp32 on CPU, e.g. --deepspeed {file.parent / file.name.replace('fp16', 'bf16')}, "
        "and keep fp16 for GPUs"
    )


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights, as in BERT's recipe."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def initialize(module: torch.nn.Module, ds: dict, training: TrainingConfig, lr_factor: Callable[[int], float]):
    """Wrap ``module`` (student + trainable loss terms) in a DeepSpeed engine.

    ``lr_factor(step)`` scales ``training.lr`` (the trainer's warmup/decay schedule).
    """
    import deepspeed

    ds = dict(ds)
    ds["optimizer"] = {
        "type": "AdamW",
        # torch's AdamW: DeepSpeed's FusedAdam would JIT-build a CUDA/CPU op first.
        "params": {"lr": training.lr, "weight_decay": training.weight_decay, "torch_adam": True},
    }

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=param_groups(module, training.weight_decay),
        config=ds,
        lr_scheduler=schedule,
    )
    if engine.zero_optimization_stage() == 0 and world_size() == 1:
        # One rank and no ZeRO: DeepSpeed would still flatten every gradient, all-reduce it with
        # itself and copy it back each step (a fixed ~1-2 ms, 5% of a toy-model step). Over one
        # rank that is the identity, so skipping it changes no bit (tests/test_engine.py).
        engine.enable_backward_allreduce = False
    return engine
