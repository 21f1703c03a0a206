"""Terms on the output distribution: hard labels, soft-label KD and the objectives that change
over a stage (Annealing-KD, Continuation-KD), and the soft cross-entropy TinyBERT uses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dskd.data import UNLABELED
from dskd.kernels import reference, soft_kl_rows
from dskd.losses.base import LossTerm, _check_kernel, register_loss


@register_loss("hard_ce")
class HardLabelLoss(LossTerm):
    """Cross-entropy with the gold labels (MSE for regression tasks such as STS-B)."""

    uses_teacher = False
    gold_labels = "labelled"

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        logits, labels = student["logits"], teacher["labels"]
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        # Rows of `data.unlabeled` (label UNLABELED, cross_entropy's ignore_index) are skipped: the mean is over
        # the others, and a batch without any gives 0, not NaN. No branch on the labels: no host sync per step.
        labelled = (labels != UNLABELED).sum().clamp(min=1)
        return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=UNLABELED) / labelled


@register_loss("soft_kd")
class SoftLabelKD(LossTerm):
    """Hinton et al. 2015: T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch.

    The T^2 factor keeps the gradient scale independent of T. The reduction is
    ``batchmean`` (sum over classes, mean over examples), not PyTorch's ``mean`` that
    PKD and TinyBERT use and which divides by the class count as well. Regression
    logits get MSE against the teacher's prediction instead.
    """

    def __init__(self, temperature: float = 1.0, kernel: str = "fused"):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature
        self.kernel = _check_kernel(kernel)

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        zs, zt = student["logits"], teacher["logits"]
        if zs.shape[-1] == 1:
            return F.mse_loss(zs.float(), zt.float())
        t = self.temperature
        flat_s, flat_t = zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1])
        rows = soft_kl_rows(flat_s, flat_t, t) if self.kernel == "fused" else reference.soft_kl_rows(flat_s, flat_t, t)
        return rows.sum() / zs.shape[0] * (t * t)


# ------------------------------------------- objectives that change over a stage


@register_loss("annealing_kd")
class AnnealingKD(LossTerm):
    """Annealing-KD phase 1 (Jafari et al., EACL 2021): MSE between the student's logits
    and the teacher's logits scaled by an annealing factor, no softmax and no labels.

    The factor follows the released code: ``k / max_temperature`` with ``k`` = 1, 2, ...,
    ``max_temperature``, each for an equal share of the stage (the code raises ``k`` every
    E1 / T_max epochs), so the teacher's logits go from 1/T_max of their size to full size.
    The MSE averages over examples and classes (torch's ``mean``, as the code). Phase 2
    (hard labels from the best phase-1 weights) is a second stage with ``keep_best`` on
    this one; see docs/methods.md.
    """

    def __init__(self, max_temperature: int = 7):
        super().__init__()
        if max_temperature < 1:
            raise ValueError("max_temperature must be at least 1")
        self.max_temperature = max_temperature

    def factor(self) -> float:
        k = min(self.max_temperature, 1 + math.floor(self.progress * self.max_temperature))
        return k / self.max_temperature

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student["logits"].float(), self.factor() * teacher["logits"].float())


@register_loss("continuation_kd")
class ContinuationKD(LossTerm):
    """Continuation KD (Jafari et al., 2022): start from a smoothed, tolerant version of the
    KD objective and make it harder until it is the standard one. The paper's exact loss
    family is unverified; this is ours (docs/methods.md, "Continuation-KD").

    With lambda = min(1, progress / ramp) going 0 -> 1 over the stage:

    * temperature tau = start_temperature^(1 - lambda) * temperature^lambda (geometric):
      a high tau smooths both distributions, so the student first matches their broad
      shape and only later the teacher's sharp (and possibly noisy) decisions;
    * per example l_i = tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau));
    * a dead zone that shrinks to nothing: max(0, l_i - margin * (1 - lambda)), so small
      disagreements with the teacher cost nothing early on.

    At lambda = 1 (after ``ramp`` of the stage) it is exactly ``soft_kd`` at ``temperature``.
    Regression logits: squared error with the same shrinking dead zone on |z_s - z_t|.
    """

    def __init__(self, temperature: float = 2.0, start_temperature: float = 8.0, margin: float = 0.1,
                 ramp: float = 1.0):
        super().__init__()
        if temperature <= 0 or start_temperature <= 0:
            raise ValueError("temperature and start_temperature must be positive")
        if margin < 0:
            raise ValueError("margin must be non-negative")
        if not 0 < ramp <= 1:
            raise ValueError("ramp (the share of the stage over which the loss hardens) must be in (0, 1]")
        self.temperature, self.start_temperature, self.margin, self.ramp = temperature, start_temperature, margin, ramp

    def hardness(self) -> float:
        return min(1.0, self.progress / self.ramp)

    def current(self) -> tuple[float, float]:
        """(temperature, dead-zone margin) at the current progress."""
        lam = self.hardness()
        return self.start_temperature ** (1 - lam) * self.temperature ** lam, self.margin * (1 - lam)

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        zs, zt = student["logits"], teacher["logits"]
        tau, margin = self.current()
        if zs.shape[-1] == 1:
            gap = (zs.float() - zt.float()).abs().squeeze(-1)
            return F.relu(gap - margin).pow(2).mean()
        rows = soft_kl_rows(zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]), tau) * (tau * tau)
        return F.relu(rows - margin).sum() / zs.shape[0]


@register_loss("soft_ce")
class SoftCrossEntropy(LossTerm):
    """TinyBERT's prediction-layer term: the soft cross-entropy
    ``-sum_c softmax(z_t/T)_c log softmax(z_s/T)_c`` with no T^2 factor, averaged over the
    batch (``reduction: batchmean``, the convention of ``soft_kd``) or over batch and
    classes (``mean``, the released code's ``.mean()``, 1/C of it). Regression tasks get
    the MSE to the gold labels, as the released code."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")
        self.temperature, self.reduction = temperature, reduction

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        zs = student["logits"].float()
        if zs.shape[-1] == 1:
            return F.mse_loss(zs.squeeze(-1), teacher["labels"].float())
        t = self.temperature
        zs, zt = zs.reshape(-1, zs.shape[-1]), teacher["logits"].float().reshape(-1, zs.shape[-1])
        cross = -(F.softmax(zt / t, dim=-1) * F.log_softmax(zs / t, dim=-1)).sum(-1)
        return cross.mean() / (zs.shape[-1] if self.reduction == "mean" else 1)


