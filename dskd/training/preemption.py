"""Stop cleanly when the scheduler asks: SIGUSR1 (Slurm's ``--signal=USR1@120``) or SIGTERM
(preemption, ``scancel``, the time limit).

A signal handler only records the request. The training loop asks ``agreed()`` after every
optimizer step. Ranks may receive the signal at slightly different moments, so they take
the maximum over all ranks: every rank then stops after the same step, writes the same
checkpoint and exits with ``EXIT_PREEMPTED``. The sbatch templates requeue the job on that
code, and the requeued job continues with ``--auto-resume``. No completed step is lost
beyond that checkpoint.
"""

from __future__ import annotations

import signal
import threading

import torch

EXIT_PREEMPTED = 85  # "checkpointed on a signal: requeue me"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device) -> bool:
        """True on every rank once any rank has received a signal."""
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
