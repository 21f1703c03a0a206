"""One writer per run folder: ``<run>/.lock`` names the process that writes the run.

Two processes writing one run (a user's ``--resume`` beside a still-running job, a job
requeued while the old one is still checkpointing) delete each other's checkpoints. The
lock is a file created exclusively by rank 0, holding the host, pid and Slurm job id. A
lock is stale, and taken over, when its process is gone (same host, pid not running), when
it belongs to this very Slurm job (a requeued job whose earlier run was killed) or when it
cannot be read. A lock of a live process, or of a process on another host, is refused with
the holder named and the way out.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from dskd.errors import DskdError
from dskd.runtime import dist

LOCK_FILE = ".lock"
_held: list[Path] = []


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale(holder: dict | None, me: dict) -> bool:
    if holder is None:
        return True
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True
    if holder.get("host") == me["host"]:
        pid = holder.get("pid")
        return not isinstance(pid, int) or pid == me["pid"] or not _alive(pid)
    return False


def _read(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def live_holder(out: Path) -> dict | None:
    """The process that holds ``out``'s lock now (host, pid, Slurm job, since), or None when the
    lock is free or stale: a grid of runs in several lanes skips a run another lane is writing."""
    holder = _read(out / LOCK_FILE) if (out / LOCK_FILE).is_file() else None
    return None if holder is None or _stale(holder, _me()) else holder


def acquire(out: Path) -> None:
    """Take ``out``'s lock (rank 0; the other ranks write under rank 0's). Idempotent."""
    if dist.rank() != 0 or not out.is_dir():
        return
    path = out / LOCK_FILE
    if path in _held:
        return
    me = _me()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if _stale(holder, me):
                path.unlink(missing_ok=True)
                continue
            raise DskdError(
                f"{out} is being written by another dskd process (pid {holder.get('pid')} on {holder.get('host')}"
                + (f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else "")
                + f", since {holder.get('since')}); wait for it to end or choose another folder. If that process "
                f"is gone, delete {path}"
            ) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me) + "\n")
        _held.append(path)
        return
    raise DskdError(f"could not take the lock {path}: it keeps reappearing; is another dskd starting on {out}?")


def release() -> None:
    """Drop every lock this process holds (at exit, whatever the outcome)."""
    while _held:
        path = _held.pop()
        holder = _read(path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            path.unlink(missing_ok=True)
