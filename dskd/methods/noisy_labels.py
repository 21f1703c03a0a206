"""Noisy-label KD (docs/methods.md): two mitigations for training labels with noise, as loss terms
(``noise_adaptive_kd``, ``small_loss_ce``); the noise itself is injected by ``data.label_noise``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dskd.errors import DskdError
from dskd.kernels import soft_kl_rows
from dskd.losses import LossTerm, register_loss
from dskd.runtime import dist


@register_loss("noise_adaptive_kd")
class NoiseAdaptiveKD(LossTerm):
    """Our mitigation for noisy labels (the paper's two are unverified): the CE / soft-label
    mix trusts the teacher more as the labels look noisier.

    ``alpha = alpha_min + (alpha_max - alpha_min) * min(1, r / r_full)`` and the loss is
    ``(1 - alpha) CE + alpha T^2 KL``, where ``r`` estimates the label noise as the share of
    training labels the teacher's prediction disagrees with: a running mean over training
    batches (momentum ``momentum``, bias-corrected, averaged over ranks, so every rank uses
    the same alpha; kept in the checkpoint). A teacher that disagrees with ``r_full`` of the
    labels or more gets ``alpha_max``. The estimate also counts the teacher's own errors,
    hence ``alpha_min`` is the weight for a clean data set. Classification only.
    """

    gold_labels = "every"

    def __init__(self, temperature: float = 2.0, alpha_min: float = 0.5, alpha_max: float = 0.9,
                 r_full: float = 0.4, momentum: float = 0.98):
        super().__init__()
        if temperature <= 0 or r_full <= 0:
            raise ValueError("temperature and r_full must be positive")
        if not 0 <= alpha_min <= alpha_max <= 1:
            raise ValueError("need 0 <= alpha_min <= alpha_max <= 1")
        if not 0 <= momentum < 1:
            raise ValueError("momentum must be in [0, 1)")
        self.temperature, self.alpha_min, self.alpha_max = temperature, alpha_min, alpha_max
        self.r_full, self.momentum = r_full, momentum
        self.register_buffer("disagreement", torch.zeros((), dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._logs: dict[str, torch.Tensor] = {}

    def noise_estimate(self) -> float:
        if int(self.updates) == 0:
            return 0.0
        return float(self.disagreement) / (1 - self.momentum ** int(self.updates))

    def alpha(self) -> float:
        share = min(1.0, self.noise_estimate() / self.r_full)
        return self.alpha_min + (self.alpha_max - self.alpha_min) * share

    def observe(self, teacher_logits: torch.Tensor, labels: torch.Tensor) -> None:
        rate = (teacher_logits.argmax(-1) != labels).double().mean().to(self.disagreement.device)
        if dist.world_size() > 1:
            rate = rate.to(dist.device())
            torch.distributed.all_reduce(rate)
            rate = rate.to(self.disagreement.device) / dist.world_size()
        self.disagreement.mul_(self.momentum).add_((1 - self.momentum) * rate)
        self.updates.add_(1)

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        zs, zt, labels = student["logits"], teacher["logits"], teacher["labels"]
        if zs.shape[-1] == 1:
            raise DskdError("`noise_adaptive_kd` estimates label noise from class predictions; it does not apply "
                            "to regression tasks")
        if self.training and torch.is_grad_enabled():  # training steps only, not held-out or eval passes
            with torch.no_grad():
                self.observe(zt, labels)
        t, alpha = self.temperature, self.alpha()
        kd = soft_kl_rows(zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]), t).sum() / zs.shape[0] * t * t
        ce = F.cross_entropy(zs.float(), labels)
        self._logs = {"alpha": torch.tensor(alpha), "noise_estimate": torch.tensor(self.noise_estimate())}
        return (1 - alpha) * ce + alpha * kd

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return dict(self._logs)


@register_loss("small_loss_ce")
class SmallLossCE(LossTerm):
    """Our second mitigation for noisy labels: small-loss selection (as in Co-teaching). The
    gold-label cross-entropy is averaged over the examples with the smallest loss only; the
    share left out grows linearly from 0 to ``drop`` over the first ``ramp`` of the stage
    (a network fits clean labels before noisy ones, so early on the large losses are not yet
    informative). Set ``drop`` near the expected noise rate. Classification only."""

    gold_labels = "every"

    uses_teacher = False

    def __init__(self, drop: float = 0.2, ramp: float = 0.5):
        super().__init__()
        if not 0 <= drop < 1:
            raise ValueError("drop (the share of examples left out) must be in [0, 1)")
        if not 0 < ramp <= 1:
            raise ValueError("ramp must be in (0, 1]")
        self.drop, self.ramp = drop, ramp
        self._logs: dict[str, torch.Tensor] = {}

    def dropped_share(self) -> float:
        return self.drop * min(1.0, self.progress / self.ramp)

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        zs, labels = student["logits"], teacher["labels"]
        if zs.shape[-1] == 1:
            raise DskdError("`small_loss_ce` selects examples by their cross-entropy; it does not apply to "
                            "regression tasks")
        losses = F.cross_entropy(zs.float(), labels, reduction="none")
        keep = max(1, len(losses) - math.floor(self.dropped_share() * len(losses)))
        self._logs = {"kept": torch.tensor(keep / len(losses))}
        return torch.topk(losses, keep, largest=False).values.mean()

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return dict(self._logs)


