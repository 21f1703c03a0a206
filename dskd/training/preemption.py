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

    def agreed(self, device, *local_flags) -> tuple[bool, ...]:
        """(a signal reached any rank, then for each of ``local_flags``: it is set on any rank):
        one all-reduce and one host sync for all, so every rank takes the same branch after the
        same step. A flag may be a bool or a 0-dim bool tensor (kept on the device until then).
        Without flags: (signalled, False)."""
        import torch  # not at import time: the handler is installed before torch loads

        local_flags = local_flags or (False,)
        flags = torch.stack([torch.tensor(self.received is not None, device=device)]
                            + [torch.as_tensor(f, device=device).reshape(()) for f in local_flags]).to(torch.int32)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(f) for f in flags.tolist())

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
