"""Resuming a run on a different number of ranks (2 GPUs -> 1, 8 -> 16 on a requeue).

What moves, and how exactly:

* **Weights and optimizer.** ZeRO 1-3 store the fp32 master weights and Adam's moments in one
  partition per rank. Such a checkpoint is converted once by DeepSpeed into one folder per
  parameter and re-partitioned for this world size on load (``dskd.runtime.reshard``); Adam's
  step count and moments carry over. ZeRO-0 checkpoints hold whole state and load as they are.
* **Data position.** Rank ``r`` of ``W`` takes positions ``r, r+W, ...`` of the epoch's seeded
  order in batches of ``batch_size``, so after ``k`` micro-batches per rank exactly the first
  ``k x batch_size x W`` examples of the order have been trained on, whatever ``W`` was. The
  resumed run skips that prefix (``epoch_offset``) and shares the rest among its own ranks:
  no example of the epoch is repeated or skipped. Length-grouped batches
  (``training.group_by_length``) form whole optimizer steps before the ranks share them
  (``dskd.data.batches.epoch_batches``): ``k`` steps used the first ``k`` of the epoch's
  seeded list of steps, whatever ``W`` was, and the resumed run skips those.
* **Global batch.** The resumed run must have the same global batch (``ranks x batch_size x
  grad_accum``), which ``training.global_batch_size`` keeps by deriving ``grad_accum``. Then
  every optimizer step averages the same examples as it would have on the old ranks, so the
  steps per epoch, the LR schedule and the stage plan are unchanged, and the trajectory equals
  the unmoved run's up to the order of float additions (micro-batch grouping, padding, the
  all-reduce) -- and dropout, whose per-rank RNG streams cannot be carried to other ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dskd.config import TrainingConfig
from dskd.errors import DskdError
from dskd.runtime import dist, reshard
from dskd.training import checkpoint
from dskd.training.engine import at_world_size


def written_by(folder: Path, run_world: int | None) -> int | None:
    """The number of ranks that wrote checkpoint ``folder`` (its manifest; for checkpoints of dskd
    before manifests, ``run_world`` from run.json)."""
    try:
        return int(json.loads((folder / checkpoint.COMPLETE).read_text())["world_size"])
    except (ValueError, KeyError, TypeError, OSError):
        return run_world


def check(folder: Path, old_world: int | None, training: TrainingConfig, raw: TrainingConfig,
          section: str) -> int | None:
    """The number of ranks the checkpoint in ``folder`` was written by when it differs from this
    job's (None when the same). Refuses a change that would alter the global batch.
    ``training``: this job's (``grad_accum`` derived), ``raw``: as configured."""
    world = dist.world_size()
    if old_world is None or old_world == world:
        return None
    old = at_world_size(raw, old_world, section)
    before = old_world * old.batch_size * old.grad_accum
    now = world * training.batch_size * training.grad_accum
    if before != now:
        fix = f"--set {section}.global_batch_size={before}" + (f" --set {section}.grad_accum=1" if raw.grad_accum != 1
                                                               else "")
        raise DskdError(
            f"--resume: {folder.parent.parent} was trained on {old_world} rank(s) with a global batch of {before} "
            f"({old_world} x {section}.batch_size {old.batch_size} x {section}.grad_accum {old.grad_accum}); on "
            f"{world} rank(s) it would be {now}, which changes the steps per epoch and the optimizer's trajectory. "
            f"Resume with `{fix}` (grad_accum is then derived for each world size), or on {old_world} rank(s)"
        )
    return old_world


def load(engine, ckpt_dir: Path, tag: str, old_world: int, batch_size: int) -> dict:
    """Restore checkpoint ``tag``, written by ``old_world`` ranks, on this world size; return the
    client state with the data position expressed for the new layout (see the module doc)."""
    folder = ckpt_dir / tag
    how = "re-partitioned" if reshard.reloads(engine) else "loaded whole (not partitioned)"
    if reshard.reloads(engine):
        converted = reshard.convert(folder)
        settings = reshard.group_settings(engine)
        state = checkpoint.load(engine, ckpt_dir, tag, engine_tag=converted.name)
        reshard.repair_after_load(engine, settings)
        reshard.remove(converted)  # (a failed load leaves it; the next attempt converts again)
    else:
        state = checkpoint.load(engine, ckpt_dir, tag)
    consumed = state.get("epoch_offset", 0) + state["batch_in_epoch"] * batch_size * old_world
    if dist.rank() == 0:
        print(f"[resume] {tag} was written by {old_world} rank(s), this job has {dist.world_size()}: optimizer "
              f"state {how}, epoch {state['epoch']} continues after its first {consumed} examples",
              file=sys.stderr, flush=True)
    return dict(state, epoch_offset=consumed, batch_in_epoch=0)
