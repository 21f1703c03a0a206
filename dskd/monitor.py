"""What the user watches: TensorBoard scalars, a rank-0 progress bar, one line per evaluation.

DeepSpeed's own tensorboard block logs only the learning rate for a non-pipeline
engine, so every loss term, the total, lr, throughput and eval metrics are written
here. Only rank 0 writes; the values it writes are averaged over ranks by the trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path


class Monitor:
    def __init__(self, log_dir: Path, enabled: bool, total_steps: int, initial_step: int, desc: str):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
