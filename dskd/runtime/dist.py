"""Which process this is: the launcher's environment, the process group, rank, world, device.

The lowest layer that knows about several processes; data loading (rank 0 first), loss
terms that gather across ranks and the training loop all ask it.
"""

from __future__ import annotations

import os

import torch

from dskd.errors import DskdError, RankError


def prepare_environment(announce: bool = False) -> None:
    """Environment that must be set before ``import deepspeed``: the accelerator, and the
    rank/world/master variables from whichever launcher started us (``dskd.runtime.launch``)."""
    from dskd.runtime import launch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    if launch.applied_threads() is None:  # not started by the CLI, which sets them before importing torch
        launch.configure_threads()
    detected = launch.detect()
    launch.apply(detected)
    if announce:
        import sys

        warning = detected.cpu_warning()
        for line in ([detected.describe()] if detected.rank == 0 else []) + ([warning] if warning else []):
            print(line, file=sys.stderr, flush=True)


def is_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def init_distributed() -> None:
    prepare_environment(announce=not torch.distributed.is_initialized())
    import deepspeed
    import deepspeed.ops

    if is_cpu() and os.environ.get("DSKD_SHM_COMM") != "1":
        # DeepSpeed JIT-compiles a shared-memory comm op on every first CPU init
        # (20-50 s, needs g++ and ninja). Plain gloo collectives give identical
        # results, so skip it unless asked for (DSKD_SHM_COMM=1).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend="gloo" if is_cpu() else "nccl", auto_mpi_discovery=False)
        except torch.distributed.DistNetworkError as exc:
            if "EADDRINUSE" not in str(exc):
                raise
            addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
            raise RankError(f"rank {os.environ.get('RANK', '0')} cannot listen on MASTER_PORT={port} "
                            f"({addr}): another process holds it (another job's rendezvous or a rank left "
                            "from an earlier run). Set MASTER_PORT to a free port, or leave it unset: launchers/local.sh, "
                            "deepspeed.sh and mpirun.sh pick one") from None


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def device() -> torch.device:
    if is_cpu():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(request: str, flag: str = "--device") -> torch.device:
    """A command's ``--device``: ``auto`` is this rank's GPU when there is one (as training
    chooses: not with ``DS_ACCELERATOR=cpu``), else the CPU; ``cpu``; ``cuda`` or ``cuda:N``
    only where that GPU exists."""
    if request == "auto":
        return device()
    if request == "cpu":
        return torch.device("cpu")
    if request == "cuda" or (request.startswith("cuda:") and request[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DskdError(f"{flag} {request}: no CUDA GPU is visible to this process (torch.cuda.is_available() "
                            f"is False, torch {torch.__version__}); use {flag} cpu or auto")
        index = int(request[5:]) if ":" in request else int(os.environ.get("LOCAL_RANK", "0"))
        count = torch.cuda.device_count()
        if index >= count:
            raise DskdError(f"{flag} {request}: this process sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    raise DskdError(f"{flag} {request!r}: expected auto, cpu, cuda or cuda:N")
