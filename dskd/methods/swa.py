"""Stochastic Weight Averaging of the student (Izmailov et al. 2018; for compact PLMs: Lu et al.,
Findings EMNLP 2022).

From ``training.swa.start`` of the run on, every ``every`` optimizer steps the student's
weights are folded into a running mean ``avg <- (n * avg + w) / (n + 1)``, kept in fp32 on
the CPU of every rank (SWA targets compact models; the copy is one student's size). The LR
is meanwhile constant or cyclic (``lr_factor`` in the trainer asks ``swa_lr_factor``).

Under ZeRO-3 each parameter is gathered (``deepspeed.zero.GatheredParameters``) to read it,
and to evaluate the average it is written on rank 0 and re-partitioned on leaving the
context; the trained weights are put back the same way, bit for bit, and the optimizer's
fp32 partitions are never touched. ZeRO 0-2 keep full parameters on every rank, so the
same code reads and writes them directly (the context is then a no-op).

The average (and its count) is saved by rank 0 as ``swa.pt`` in every checkpoint and read
back on resume. ``export_state`` hands it to ``dskd export``, which exports it instead of the trained weights when present, so
``model/`` and ``dskd export`` both give the averaged student.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from dskd.config import SwaConfig
from dskd.methods.base import Method, register_method
from dskd.runtime import dist

STATE_FILE = "swa.pt"


def start_step(cfg: SwaConfig, total_steps: int) -> int:
    """First optimizer step (1-based, the step just taken) whose weights enter the average."""
    return max(1, min(total_steps, int(round(cfg.start * total_steps))))


def averages_at(cfg: SwaConfig, step: int, total_steps: int) -> bool:
    """Whether the weights after optimizer step ``step`` (1-based) are folded into the average.
    The last step always is, so the average ends with the final weights' cycle."""
    first = start_step(cfg, total_steps)
    return step >= first and ((step - first) % cfg.every == 0 or step == total_steps)


def swa_lr_factor(cfg: SwaConfig, step: int, total_steps: int) -> float | None:
    """The LR factor for optimizer step ``step`` (0-based) in the SWA phase; None before it.

    ``constant``: ``lr_high`` throughout. ``cyclic``: each cycle of ``every`` steps falls
    linearly from ``lr_high`` to ``lr_low``, reaching it at the step that is averaged.
    """
    first = start_step(cfg, total_steps)
    if step + 1 < first:
        return None
    if cfg.lr == "constant" or cfg.every == 1:
        return cfg.lr_high
    position = (step + 1 - first) % cfg.every  # 0 at an averaged step
    t = 1.0 if position == 0 else position / cfg.every
    return cfg.lr_high + (cfg.lr_low - cfg.lr_high) * t


def _params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


class WeightAverage:
    """The running mean of the trainable weights of ``module`` (the engine's module: the
    student under ``model.`` plus loss-term parameters such as projections)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.count = 0
        self.average: dict[str, torch.Tensor] = {}

    def update(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        n = self.count
        for name, p in _params(self.module):
            with GatheredParameters([p], modifier_rank=None):
                current = p.detach().to("cpu", torch.float32)
                if n == 0:
                    self.average[name] = current.clone()
                else:
                    self.average[name].mul_(n / (n + 1)).add_(current, alpha=1 / (n + 1))
        self.count = n + 1

    @contextlib.contextmanager
    def applied(self):
        """Inside: the module holds the averaged weights (a no-op before the first update)."""
        if self.count == 0:
            yield
            return
        saved = {}

        def swap_in(name: str, p: torch.nn.Parameter) -> torch.Tensor:
            saved[name] = p.detach().clone()
            return self.average[name]

        self._write(swap_in)
        try:
            yield
        finally:
            self._write(lambda name, p: saved[name])

    def _write(self, value_for) -> None:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        for name, p in _params(self.module):
            with GatheredParameters([p], modifier_rank=0):
                new = value_for(name, p)
                if dist.rank() == 0 or not hasattr(p, "ds_id"):
                    with torch.no_grad():
                        p.data.copy_(new.to(p.dtype))

    def state_dict(self) -> dict:
        return {"count": self.count, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.average = {k: v.float() for k, v in state["average"].items()}

    def save(self, tag_dir: Path) -> None:
        if dist.rank() == 0 and self.count:
            torch.save(self.state_dict(), tag_dir / STATE_FILE)

    def load(self, tag_dir: Path) -> None:
        if (tag_dir / STATE_FILE).is_file():
            self.load_state_dict(torch.load(tag_dir / STATE_FILE, map_location="cpu", weights_only=True))


def averaged_state(tag_dir: Path) -> dict[str, torch.Tensor] | None:
    """The averaged weights a checkpoint holds, by engine-module name (None without SWA)."""
    path = Path(tag_dir) / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)["average"]


@register_method("swa")
class Swa(Method):
    """The run-level part: the SWA learning rate, the average after each optimizer step, the
    average evaluated and exported, and kept in every checkpoint."""

    def __init__(self, cfg, role: str):
        super().__init__(cfg, role)
        self.swa = (cfg.finetune if role == "finetune" else cfg.training).swa
        self.average: WeightAverage | None = None

    @classmethod
    def enabled(cls, cfg, role: str) -> bool:
        return (cfg.finetune if role == "finetune" else cfg.training).swa is not None

    def lr_factor(self, step: int, end: int) -> float | None:
        return swa_lr_factor(self.swa, step, end)

    def bind_engine(self, engine) -> None:
        self.average = WeightAverage(engine.module)

    def load_state(self, folder: Path) -> None:
        self.average.load(folder)

    def after_step(self, run, step: int) -> None:
        if averages_at(self.swa, step, run.end):
            self.average.update()
            run.monitor.scalars({"swa/snapshots": float(self.average.count)}, step)

    def evaluating(self):
        return self.average.applied()

    def save_state(self, folder: Path) -> None:
        self.average.save(folder)

    @classmethod
    def export_state(cls, folder: Path) -> dict | None:
        return averaged_state(folder)
