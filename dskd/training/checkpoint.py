"""Write-once, verified DeepSpeed checkpoints with everything needed for an exact resume.

Layout under ``<run>/checkpoints``::

    step00000120/            DeepSpeed's files (model, ZeRO optimizer partitions)
        rng_rank{r}.pt       each rank's RNG streams (client_state is written by rank 0 only)
        COMPLETE             the manifest: size and SHA-256 of every file above, all ranks'
    latest                   tag of the newest complete checkpoint, replaced atomically

A checkpoint is written under ``step00000120.partial`` and renamed once every rank has
finished and the manifest is on disk, so a folder without ``.partial`` is never half
written, and a complete checkpoint is never written again (a run that is resumed at a step
it already saved keeps that checkpoint as it is). On resume the newest checkpoint whose
files match their manifest is used; older ones are the fallback when a file was truncated,
garbled or deleted. Checkpoints of dskd before manifests (``COMPLETE`` reads ``ok``) are
accepted unverified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from dskd.errors import DskdError
from dskd.runtime import dist as eng
from dskd.teacher.cache import human

COMPLETE = "COMPLETE"
LATEST = "latest"
PARTIAL = ".partial"
DAMAGED = ".damaged"  # a checkpoint that failed its manifest, kept for inspection, never loaded
TAG = re.compile(r"step\d{8}")
MANIFEST_FORMAT = 1


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    """Every RNG stream as tensors and plain numbers, so it loads with ``weights_only=True``."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def write_manifest(folder: Path, step: int) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": eng.world_size(), "files": files}
    _atomic_write(folder / COMPLETE, json.dumps(manifest, indent=1) + "\n")


def verify(folder: Path, full: bool = True) -> str | None:
    """Why the checkpoint in ``folder`` cannot be trusted, or None when it can. ``full``: compare
    every file's SHA-256 with the manifest; else sizes only (catches truncation and deletion)."""
    try:
        text = (folder / COMPLETE).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"its {COMPLETE} marker cannot be read ({exc})"
    if text.strip() == "ok":  # before manifests: nothing to compare against
        return None
    try:
        manifest = json.loads(text)
        expected = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {COMPLETE} manifest is not valid JSON"
    if not isinstance(expected, dict) or not all(isinstance(m, dict) and {"size", "sha256"} <= set(m)
                                                 for m in expected.values()):
        return f"its {COMPLETE} manifest is not a manifest of dskd (no size and SHA-256 per file)"
    for name, meta in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != meta["size"]:
            return f"{name} has {size} bytes, the manifest says {meta['size']}"
        if full and _sha256(path) != meta["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (the file was changed or damaged)"
    extra = sorted(set(str(p.relative_to(folder)) for p in _files(folder)) - set(expected))
    if extra:
        return f"{extra[0]} is not in the manifest"
    return None


def checkpoint_bytes(params: int, dtype: torch.dtype, zero_stage: int) -> int:
    """One checkpoint's size: the module's weights in the run dtype, and Adam's two fp32 moments;
    ZeRO (and mixed precision) also store fp32 master weights. Measured within 1% on the tiny
    runs of tests/test_checkpoints.py."""
    weights = params * torch.finfo(dtype).bits // 8
    master = params * 4 if zero_stage > 0 or dtype != torch.float32 else 0
    return weights + master + params * 8


def check_free_space(out: Path, params: int, dtype: torch.dtype, zero_stage: int, keep: int) -> str | None:
    """Refuse to train when the output file system cannot take one checkpoint and the exported
    model; return a warning when it cannot take the ``keep + 1`` a run holds at its peak."""
    one = checkpoint_bytes(params, dtype, zero_stage)
    free = shutil.disk_usage(out).free
    if free < one + params * 4:
        raise DskdError(f"{out}: {human(free)} free, but one checkpoint of this run takes about {human(one)} (and the "
                        f"exported model {human(params * 4)}); free space or choose another --output")
    peak = one * (keep + 1) + params * 4
    if free < peak:
        return (f"[disk] {out}: {human(free)} free; with training.keep_checkpoints={keep} the run needs about "
                f"{human(peak)} at its peak, so it may fail when the disk fills")
    return None


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG.fullmatch(p.name) and (p / COMPLETE).is_file())


def set_aside_newer(ckpt_dir: Path, tag: str) -> list[str]:
    """Rename the complete checkpoints newer than ``tag`` (those a resume skipped as damaged) to
    ``<tag>.damaged``, so the resumed run writes its own at those steps (rank 0)."""
    moved = []
    for newer in [t for t in complete_tags(ckpt_dir) if t > tag]:
        target = ckpt_dir / f"{newer}{DAMAGED}"
        shutil.rmtree(target, ignore_errors=True)
        os.replace(ckpt_dir / newer, target)
        moved.append(target.name)
    return moved


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint (not verified: see ``newest_verified``)."""
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def newest_verified(ckpt_dir: Path, full: bool = True) -> tuple[str | None, list[str]]:
    """The newest checkpoint whose files match their manifest, and a line for each newer one
    skipped (which file, and why). Rank 0 reads the files; the others get its answer."""
    answer = [None, []]
    if eng.rank() == 0:
        for tag in reversed(complete_tags(ckpt_dir)):
            problem = verify(ckpt_dir / tag, full)
            if problem is None:
                answer[0] = tag
                break
            answer[1].append(f"checkpoint {tag} skipped: {problem}")
    if torch.distributed.is_initialized() and eng.world_size() > 1:
        torch.distributed.broadcast_object_list(answer, src=0, device=eng.device())  # NCCL: this rank's GPU
    return answer[0], answer[1]


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, write_extra=None) -> str:
    """Collective: every rank must call it. ``write_extra(tag_dir)``, called on every rank
    before the checkpoint is marked complete, adds files of our own (a method's state,
    `Method.save_state`). A complete checkpoint of this step is kept, not rewritten."""
    tag = tag_for(step)
    final, partial = ckpt_dir / tag, ckpt_dir / (tag + PARTIAL)
    if (final / COMPLETE).is_file():
        return tag
    eng.barrier()
    if eng.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a save killed earlier
    eng.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{eng.rank()}.pt")
        if write_extra is not None:
            write_extra(partial)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        failure = exc
    if _on_any_rank(failure is not None):
        error = _write_error(failure, partial)  # before the space is freed: a full disk is how it is told
        eng.barrier()
        if eng.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # frees the space it took, so run.json can still be written
        raise error
    eng.barrier()
    if eng.rank() == 0:
        for name in os.listdir(partial):
            _fsync(partial / name)
        write_manifest(partial, step)
        if final.exists():  # a folder of this step without a marker: a save killed before this format
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(ckpt_dir)
        _atomic_write(ckpt_dir / LATEST, tag + "\n")
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    eng.barrier()
    return tag


def _on_any_rank(flag: bool) -> bool:
    if not (torch.distributed.is_initialized() and eng.world_size() > 1):
        return flag
    tensor = torch.tensor([int(flag)], device=eng.device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def _write_error(exc: Exception | None, partial: Path) -> Exception:
    """An OSError naming the checkpoint folder when the disk is full, the error itself otherwise.
    (A failure on another rank only: that rank names it.)"""
    if exc is None:
        return DskdError(f"another rank could not write its part of {partial.name}; see its error above")
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(partial.parent).free < 2**20
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial.parent / partial.name.removesuffix(PARTIAL)))
    return exc


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(engine, ckpt_dir: Path, tag: str, engine_tag: str | None = None) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG; return our client state.
    ``engine_tag``: the folder DeepSpeed reads instead of ``tag`` (its conversion for another world size)."""
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=engine_tag or tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if client is None or "dskd" not in client:
        raise DskdError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint (no model states for this "
                        "rank); resume with the number of ranks it was written by")
    rng_file = ckpt_dir / tag / f"rng_rank{eng.rank()}.pt"
    if rng_file.is_file():
        if is_legacy(ckpt_dir / tag):  # dskd before manifests pickled numpy arrays
            set_rng_state(_legacy_rng(torch.load(rng_file, weights_only=False)))
        else:
            set_rng_state(torch.load(rng_file, weights_only=True))
    return client["dskd"]


def client_state(ckpt_dir: Path, tag: str) -> dict:
    """dskd's client state of checkpoint ``tag`` (step, last evaluation, teacher metrics, ...),
    read without restoring anything; {} when it cannot be read."""
    try:
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True,
                            mmap=True)  # mmap: a ZeRO-0 file holds all the weights, which are not needed here
    except Exception:  # an unreadable or foreign file: the caller does without
        return {}
    state = states.get("dskd") if isinstance(states, dict) else None
    return state if isinstance(state, dict) else {}


def is_legacy(folder: Path) -> bool:
    return (folder / COMPLETE).read_text(errors="replace").strip() == "ok"


def _legacy_rng(state: dict) -> dict:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, mt, gauss = state["python"]
    return dict(state, python=[version, list(mt), gauss],
                numpy=[kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, cached])


def consolidated_state_dict(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the engine's module, from any ZeRO stage, on CPU."""
    if zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    # Non-tensor entries are terms' extra state (RW-KD's meta-learner), not weights.
    return {k: v.float() for k, v in states["module"].items() if torch.is_tensor(v)}
