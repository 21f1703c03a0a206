"""Logit MSE with a warm-up: the worked example of a method plugin (docs/design.md, "Adding a
method"). One file, one recipe (configs/examples/logit_mse.yaml), one test
(tests/test_logit_mse.py); nothing else in dskd changes.

The term: ``w * mean((z_s - z_t)^2)`` over the batch and the classes, where ``w`` ramps
linearly from 0 to 1 over the first ``warmup`` share of each schedule stage and then stays 1
(it reads ``LossTerm.progress``, which the loop sets from the step counter, so a resumed run
sees the same ``w``). The run-level part: a line at the start of the run saying so.
"""

from __future__ import annotations

import torch

from dskd.losses import LossTerm, register_loss, term_type
from dskd.methods.base import Method, register_method


@register_loss("logit_mse")
class LogitMSE(LossTerm):
    def __init__(self, warmup: float = 0.1):
        super().__init__()
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup is the share of a stage over which the weight ramps up; it must be in [0, 1), "
                             f"got {warmup}")
        self.warmup = warmup
        self._logs: dict[str, torch.Tensor] = {}

    def factor(self) -> float:
        return 1.0 if self.warmup == 0 else min(1.0, self.progress / self.warmup)

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        zs, zt = student["logits"].float(), teacher["logits"].float()
        factor = self.factor()
        self._logs = {"factor": zs.new_tensor(factor)}
        return factor * (zs - zt).pow(2).mean()

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return dict(self._logs)  # logged as train/loss/<term>/factor


@register_method("logit_mse")
class LogitMSEWarmup(Method):
    @classmethod
    def enabled(cls, cfg, role: str) -> bool:
        return role == "distill" and any(term_type(n, s) == "logit_mse" for n, s in cfg.losses.items())

    def describe(self, job) -> list[str]:
        return [f"[logit_mse] losses.{name}: weight ramps 0 -> 1 over the first {term.warmup:.0%} of each stage"
                for name, term in job.terms.items() if isinstance(term, LogitMSE)]
