"""What the user watches: TensorBoard scalars, a rank-0 progress bar, one line per evaluation.

DeepSpeed's own tensorboard block logs only the learning rate for a non-pipeline
engine, so every loss term, the total, lr, throughput and eval metrics are written
here. Only rank 0 writes; the values it writes are averaged over ranks by the trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

# Attention maps are scaled up so that one map is about this many pixels wide in TensorBoard.
MAP_PIXELS = 192


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

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        """The run's settings and final metrics for TensorBoard's hparams plugin (sweeps compare them)."""
        if self.writer is not None:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def set_total(self, total: int) -> None:
        """A plateau rule ended a stage early: the run is now ``total`` steps long."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def attention_image(self, tag: str, student_qk, teacher_qk, mask: torch.Tensor, groups: tuple[int, int],
                        heads: int, step: int) -> None:
        """One example's attention, teacher left and student right, one row per compared head."""
        if self.writer is None:
            return
        self.writer.add_image(tag, attention_grid(student_qk, teacher_qk, mask, groups, heads), step, dataformats="HW")

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


def attention_grid(student_qk, teacher_qk, mask: torch.Tensor, groups: tuple[int, int], heads: int) -> np.ndarray:
    """A grey image of the distributions the attention loss compares for the first example:
    for each of the first ``heads`` (grouped) heads, teacher | student over the real tokens,
    each map scaled by its own maximum so both are readable."""
    from dskd.losses import attention_log_probs, average_heads

    key_mask = mask.bool()
    n = int(key_mask[0].sum())
    maps = []
    for (q, k), group in ((teacher_qk, groups[1]), (student_qk, groups[0])):
        probs = average_heads(attention_log_probs(q[:1], k[:1], key_mask[:1]), group).exp()[0, :heads, :n, :n]
        maps.append(probs / probs.amax(dim=(-1, -2), keepdim=True).clamp_min(1e-12))
    gap = torch.ones(n, 1)
    rows = []
    for h in range(maps[0].shape[0]):
        rows.append(torch.cat([maps[0][h].cpu(), gap, maps[1][h].cpu()], dim=1))
        rows.append(torch.ones(1, 2 * n + 1))
    image = torch.cat(rows[:-1], dim=0).numpy()
    scale = max(1, min(16, MAP_PIXELS // max(n, 1)))
    return np.kron(image, np.ones((scale, scale), dtype=np.float32)).astype(np.float32)
