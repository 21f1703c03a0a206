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

    def agreed(self, device, local_flag=False) -> tuple[bool, bool]:
        """(a signal reached any rank, ``local_flag`` is set on any rank): one all-reduce and one
        host sync for both, so every rank takes the same branch after the same step.
        ``local_flag`` may be a bool or a 0-dim bool tensor (kept on the device until then)."""
        import torch  # not at import time: the handler is installed before torch loads

        flags = torch.stack([torch.tensor(self.received is not None, device=device),
                             torch.as_tensor(local_flag, device=device).reshape(())]).to(torch.int32)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, flagged = flags.tolist()
        return bool(signalled), bool(flagged)

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
