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

    def agreed(self, device, local_flag: bool = False) -> tuple[bool, bool]:
        """(a signal reached any rank, ``local_flag`` is set on any rank): one all-reduce for both,
        so every rank takes the same branch after the same step."""
        import torch  # not at import time: the handler is installed before torch loads

        flags = torch.tensor([1 if self.received is not None else 0, int(bool(local_flag))], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
