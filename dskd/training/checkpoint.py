"""Crash-safe DeepSpeed checkpoints with everything needed for an exact resume.

Layout under ``<run>/checkpoints``::

    step00000120/            DeepSpeed's files (model, ZeRO optimizer partitions)
        rng_rank{r}.pt       each rank's RNG streams (client_state is written by rank 0 only)
        COMPLETE             written after every rank finished writing
    latest                   tag of the newest COMPLETE checkpoint, replaced atomically

A crash during a save leaves a tag folder without ``COMPLETE`` and ``latest`` still
pointing at the previous good checkpoint. DeepSpeed's own ``latest`` is not used: it is
written before all ranks are known to have finished.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dskd.runtime import dist as eng

COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if (p / COMPLETE).is_file())


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else the newest complete one."""
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, write_extra=None) -> str:
    """Collective: every rank must call it. ``write_extra(tag_dir)``, called on every rank
    before the checkpoint is marked complete, adds files of our own (a method's state, `Method.save_state`)."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{eng.rank()}.pt")
    if write_extra is not None:
        write_extra(ckpt_dir / tag)
    eng.barrier()
    if eng.rank() == 0:
        _atomic_write(ckpt_dir / tag / COMPLETE, "ok\n")
        _atomic_write(ckpt_dir / LATEST, tag + "\n")
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    eng.barrier()
    return tag


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG; return our client state."""
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    rng_file = ckpt_dir / tag / f"rng_rank{eng.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client["dskd"]


def consolidated_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the engine's module, from any ZeRO stage, on CPU."""
    if zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    # Non-tensor entries are terms' extra state (RW-KD's meta-learner), not weights.
    return {k: v.float() for k, v in states["module"].items() if torch.is_tensor(v)}
