"""DeepSpeed's universal checkpoints: a ZeRO checkpoint re-partitioned for another number of ranks.

ZeRO 1-3 store the fp32 master weights and Adam's moments in one partition per rank. DeepSpeed's
``ds_to_universal`` rewrites such a checkpoint as one folder per parameter, and an engine built
with ``checkpoint.load_universal`` loads it at any world size. (``dskd.training.rescale`` decides
when; this module only speaks DeepSpeed's terms, which the training layer keeps out of its text.)
"""

from __future__ import annotations

import contextlib
import io
import shutil
from argparse import Namespace
from pathlib import Path

from dskd.errors import DskdError
from dskd.runtime import dist

SUFFIX = ".universal"  # beside the checkpoint folder, so it is never taken for a checkpoint itself


def partitioned(folder: Path) -> bool:
    """Whether the optimizer state is split into one file per rank (ZeRO 1-3)."""
    return any(folder.glob("*zero_pp_rank_*_optim_states.pt"))


def reload_config(ds_config: dict) -> dict:
    """The DeepSpeed config of an engine that loads a converted checkpoint."""
    return dict(ds_config, checkpoint=dict(ds_config.get("checkpoint", {}), load_universal=True))


def reloads(engine) -> bool:
    return bool(engine.load_universal_checkpoint())


def convert(folder: Path) -> Path:
    """``folder`` converted for any world size, in ``<folder>.universal`` (rank 0 converts, every
    rank returns its path). A conversion left half done by a killed job is redone."""
    target = folder.with_name(folder.name + SUFFIX)
    if dist.rank() == 0:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(target, ignore_errors=True)
        args = Namespace(input_folder=str(folder), output_folder=str(target), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        try:
            # It prints a line per step and a progress bar per parameter: keep them out of the log.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal(args)
        except Exception as exc:  # DeepSpeed raises plain assertions and errors
            shutil.rmtree(target, ignore_errors=True)
            raise DskdError(f"--resume: DeepSpeed could not convert {folder} for a new number of ranks "
                            f"({type(exc).__name__}: {exc}); resume on the ranks that wrote it") from exc
    dist.barrier()
    return target


def group_settings(engine) -> list[dict]:
    """Each optimizer parameter group's own settings (weight decay, betas, ...), but for what the
    checkpoint restores (the LR schedule's lr)."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
            for group in _inner(engine).param_groups]


def repair_after_load(engine, settings: list[dict]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 loader of converted checkpoints (harmless for the
    other stages, which load each group as it was): it copies the first parameter group's settings
    onto every group (the biases and LayerNorm weights, which dskd keeps out of weight decay, would
    decay), and it gives every group one shared ``step`` tensor, which torch's AdamW then advances
    once per group and step (27 instead of 16 after 11 steps from step 5: a wrong bias correction)."""
    import torch

    optimizer = _inner(engine)
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _inner(engine):
    """The torch optimizer inside DeepSpeed's ZeRO wrapper."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def remove(target: Path) -> None:
    """Delete a conversion once every rank has loaded it."""
    dist.barrier()
    if dist.rank() == 0:
        shutil.rmtree(target, ignore_errors=True)
