"""Loss terms: one signature, one registry.

Every term is an ``nn.Module`` called as ``term(student, teacher, mask)``:

* ``student`` / ``teacher`` are dicts of model outputs: ``logits``, and for the
  layer-wise terms lists aligned with ``student["pairs"]`` (the mapped (student layer,
  teacher layer) pairs active in this stage): ``attention_qk`` (captured Q, K per
  layer, see ``dskd.capture``) and ``cls`` (the [CLS] vector after each layer). The
  teacher side also carries the batch's ground-truth ``labels``: for the hard-label
  term the data set is the teacher. ``cls_all`` (need of the same name) is the [CLS]
  vector after every layer, not only the mapped ones (Universal-KD).
* ``mask`` is the batch's attention mask ``[B, S]`` (1 = real token).

A term declares which outputs it ``needs`` so the teacher is asked only for those, and
whether it ``uses_teacher`` at all (fine-tuning without a teacher). Terms may own
parameters (projections); they are trained with the student because the trainer
puts every term inside the module DeepSpeed wraps, so they also land in checkpoints.

New terms register with ``@register_loss("name")`` and become usable from YAML as
``losses: {name: {weight: ..., <constructor args>}}`` without touching the trainer.
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dskd.errors import DskdError
from dskd.kernels import attention_kl_rows, hidden_rows, reduce_rows, reference, soft_kl_rows
from dskd.kernels import attention_log_probs, average_heads  # noqa: F401  (re-exported: the monitor draws maps with them)

KERNELS = ("fused", "naive")


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'fused' or 'naive', got {kernel!r}")
    return kernel

LOSS_REGISTRY: dict[str, type["LossTerm"]] = {}


def register_loss(name: str) -> Callable[[type["LossTerm"]], type["LossTerm"]]:
    def decorator(cls: type[LossTerm]) -> type[LossTerm]:
        if name in LOSS_REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSS_REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorator


class LossTerm(nn.Module):
    registry_name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    uses_teacher: ClassVar[bool] = True
    # Fraction of the current schedule stage already done, in [0, 1): the trainer sets it
    # before every step (from the step counter, so a resumed run sees the same values).
    # Terms whose objective changes over a stage (Annealing-KD, Continuation-KD) read it.
    progress: float = 0.0

    @classmethod
    def needs_for(cls, spec: dict) -> frozenset[str]:
        """What a term configured by ``spec`` reads (before it is built; the teacher cache asks)."""
        return cls.needs

    def extra_logs(self) -> dict[str, torch.Tensor]:
        """Diagnostics of the last call, logged as ``<term>/<key>`` beside its value (not in the loss)."""
        return {}

    def bind_job(self, job, key: str) -> None:
        """Called once the run is prepared (models, data, teacher) and before anything is
        written: terms with work of their own beside the loss (a meta-learner, a generator)
        check the job here and take what they need from it. ``key`` names the term in errors."""

    def before_micro_step(self, step, batch: dict) -> dict:
        """Called before every training micro-step of a stage in which the term is on, with
        ``step`` a ``trainer.StepContext``. A term may do extra work here (update a meta-learner
        or a generator) and return the batch with more inputs (Glitter's candidates). What it
        does must follow from the seed, the step counter and the rank only, so that a resumed
        run repeats it exactly."""
        return batch

    def bind_run(self, cfg, key: str) -> None:
        """Called once with the experiment config once the term is built (and bound), before
        anything runs: for terms that read files made for one teacher and task (Universal-KD's
        teacher probes) and must refuse others. ``key`` names the term in errors."""

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


@register_loss("hard_ce")
class HardLabelLoss(LossTerm):
    """Cross-entropy with the gold labels (MSE for regression tasks such as STS-B)."""

    uses_teacher = False

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        logits, labels = student["logits"], teacher["labels"]
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels)


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


# ------------------------------------------------------- training labels with noise


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
        from dskd import engine as eng

        rate = (teacher_logits.argmax(-1) != labels).double().mean().to(self.disagreement.device)
        if eng.world_size() > 1:
            rate = rate.to(eng.device())
            torch.distributed.all_reduce(rate)
            rate = rate.to(self.disagreement.device) / eng.world_size()
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


# ------------------------------------------------- internal representations (per layer)


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer-wise term must know about the two models, fixed once they are built."""

    pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer), 1-based, every mapped pair
    student_hidden: int
    teacher_hidden: int
    student_heads: int
    teacher_heads: int
    student_depth: int = 0  # layers of each model (0: unknown, e.g. a hand-built geometry in a test)
    teacher_depth: int = 0


class LayerwiseTerm(LossTerm):
    """A term computed for each mapped (student layer, teacher layer) pair and summed.

    The outputs it reads are lists aligned with ``student["pairs"]``: the pairs active in
    the current stage (all of them, one for a PID stage, the lower k for SID). The
    trainer logs each pair's value as ``<term>/L<student layer>``. A term with
    ``per_pair = False`` reads the mapped layers but gives one value for all of them
    (e.g. CoDIR, which concatenates them).
    """

    per_pair: ClassVar[bool] = True

    def compares(self, pair: tuple[int, int]) -> bool:
        """Whether this term compares the mapped (student, teacher) ``pair`` (all by default)."""
        return True

    def bind_data(self, labels: torch.Tensor, idx: torch.Tensor, is_regression: bool, seed: int) -> None:
        """Called once with the training set's labels and dataset indices (e.g. to size a memory bank)."""

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        """Create parameters / check shapes once the models are known (``key`` names the term in errors)."""

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.pair_losses(student, teacher, mask)).sum()


def head_groups(student_heads: int, teacher_heads: int, rule: str, key: str) -> tuple[int, int]:
    """How many consecutive heads to average on each side so the counts match: (student, teacher).

    ``auto``: equal counts compare head by head; when one count divides the other, the
    larger side's heads are averaged in consecutive groups (a mean of distributions is
    a distribution). ``mean``: both sides are averaged over all heads.
    """
    if rule == "mean":
        return student_heads, teacher_heads
    if student_heads == teacher_heads:
        return 1, 1
    if teacher_heads % student_heads == 0:
        return 1, teacher_heads // student_heads
    if student_heads % teacher_heads == 0:
        return student_heads // teacher_heads, 1
    raise DskdError(
        f"`{key}`: the student has {student_heads} attention heads and the teacher {teacher_heads}; neither "
        "divides the other, so heads cannot be grouped. Set `heads: mean` to compare head-averaged attention"
    )


def attention_kl(
    student_qk: tuple[torch.Tensor, torch.Tensor],
    teacher_qk,
    mask: torch.Tensor,
    groups: tuple[int, int] = (1, 1),
    kernel: str = "fused",
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions, from Q and K.

    Summed over real keys, averaged over heads and over the real query rows of the
    batch (padded rows and columns contribute nothing; 0 when no row is real).
    ``kernel``: ``fused`` (``dskd.kernels``: chunked, or Triton on CUDA) or ``naive``
    (every [B, H, S, S] tensor materialised); both give the same numbers. ``teacher_qk``
    may also be the teacher's attention probabilities [B, H_t, S, S].
    """
    rows_fn = attention_kl_rows if kernel == "fused" else reference.attention_kl_rows
    return reduce_rows(rows_fn(student_qk, teacher_qk, mask, groups), mask)


@register_loss("attention_kl")
class AttentionKL(LayerwiseTerm):
    """Aguilar et al. (2020): KL(teacher || student) of self-attention distributions per mapped layer.

    The distributions are recomputed from the captured Q and K, so they are free of
    attention-dropout and need no eager attention. ``heads``: ``auto`` (per head, or
    averaged in groups when one head count divides the other) or ``mean`` (compare
    head-averaged maps); see ``head_groups``.
    """

    needs = frozenset({"attention_qk"})

    def __init__(self, heads: str = "auto", kernel: str = "fused"):
        super().__init__()
        if heads not in ("auto", "mean"):
            raise ValueError(f"heads must be 'auto' or 'mean', got {heads!r}")
        self.heads = heads
        self.kernel = _check_kernel(kernel)
        self.groups = (1, 1)

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.groups = head_groups(geometry.student_heads, geometry.teacher_heads, self.heads, key)

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        return [
            attention_kl(s_qk, t_qk, mask, self.groups, self.kernel)
            for s_qk, t_qk in zip(student["attention_qk"], teacher["attention_qk"], strict=True)
        ]


@register_loss("cls_cosine")
class ClsCosine(LayerwiseTerm):
    """Aguilar et al. (2020): 1 - cos between the student's and teacher's [CLS] vectors per mapped layer.

    When the hidden sizes differ, each mapped student layer gets a trainable linear map
    into the teacher's width. It is a parameter of this term, so it is trained by the
    engine's optimizer and saved in (and restored from) checkpoints with the student.
    """

    needs = frozenset({"cls"})

    def __init__(self, kernel: str = "fused"):
        super().__init__()
        self.kernel = _check_kernel(kernel)
        self.projections = nn.ModuleDict()

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        if geometry.student_hidden != geometry.teacher_hidden:
            for s, _ in geometry.pairs:
                self.projections[f"L{s}"] = nn.Linear(geometry.student_hidden, geometry.teacher_hidden)

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for (s, _), hs, ht in zip(student["pairs"], student["cls"], teacher["cls"], strict=True):
            name = f"L{s}"
            if name in self.projections:
                # Called as a module (not through the kernel's projection) so ZeRO-3 gathers it.
                hs = self.projections[name](hs)
            if self.kernel == "fused":
                values.append(hidden_rows(hs, ht, "cosine").mean())
            else:
                values.append(reference.hidden_rows(hs, ht, "cosine").mean())
        return values


@register_loss("pkd")
class PatientKD(LayerwiseTerm):
    """PKD (Sun et al., EMNLP 2019), the patient-teacher term: per mapped layer, the MSE
    between the L2-normalised [CLS] vectors of student and teacher (``normalize: false``
    compares them raw, the code's other setting). With ``exclude_last`` (default, as the
    paper) the student's top mapped layer is left to the soft-label term. The MSE averages
    over the batch and the features (torch's ``mean``, as the released code). Widths that
    differ get a trainable projection per layer, as ``cls_cosine``."""

    needs = frozenset({"cls"})

    def __init__(self, normalize: bool = True, exclude_last: bool = True):
        super().__init__()
        self.normalize, self.exclude_last = normalize, exclude_last
        self.projections = nn.ModuleDict()
        self.last = None

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.last = max(s for s, _ in geometry.pairs) if self.exclude_last else None
        if self.exclude_last and len(geometry.pairs) < 2:
            raise DskdError(f"`{key}` with `exclude_last: true` needs at least 2 mapped layers; the layer map has "
                            f"{len(geometry.pairs)}")
        if geometry.student_hidden != geometry.teacher_hidden:
            for s, _ in geometry.pairs:
                self.projections[f"L{s}"] = nn.Linear(geometry.student_hidden, geometry.teacher_hidden)

    def compares(self, pair: tuple[int, int]) -> bool:
        return pair[0] != self.last

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for (s, _), hs, ht in zip(student["pairs"], student["cls"], teacher["cls"], strict=True):
            if f"L{s}" in self.projections:
                hs = self.projections[f"L{s}"](hs)
            hs, ht = hs.float(), ht.float()
            if self.normalize:
                hs, ht = F.normalize(hs, dim=-1), F.normalize(ht, dim=-1)
            values.append(hidden_rows(hs, ht, "mse").mean())
        return values


# ------------------------------------------------------------- TinyBERT and MiniLM


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Pre-softmax attention scores ``Q K^T / sqrt(head_dim)`` in fp32 (fp64 stays), [B, H/group, S, S].

    Consecutive groups of ``group`` heads are averaged (see ``head_groups``). Entries of
    a padded key or a padded query row are 0: TinyBERT zeroes the masked entries (scores
    <= -100 after the -10000 mask, i.e. padded keys) on both sides; we zero the padded
    query rows too, which carry no information.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if group > 1:
        b, h, s, t = scores.shape
        scores = scores.reshape(b, h // group, group, s, t).mean(2)
    real = mask.bool()
    return scores.masked_fill(~(real[:, None, :, None] & real[:, None, None, :]), 0.0)


@register_loss("tinybert_attention")
class TinyBertAttention(LayerwiseTerm):
    """TinyBERT (Jiao et al., 2020) attention term: per mapped layer, the MSE between the
    pre-softmax attention scores of student and teacher, rebuilt from the captured Q and K.

    Masked entries (padded keys and padded query rows) are 0 on both sides and the MSE is
    torch's ``mean`` over all [B, H, S, S] entries, padding included, as the released code.
    Different head counts are grouped by averaging scores (``heads: auto``, when one count
    divides the other) or compared head-averaged (``heads: mean``); TinyBERT has equal counts.
    """

    needs = frozenset({"attention_qk"})

    def __init__(self, heads: str = "auto"):
        super().__init__()
        if heads not in ("auto", "mean"):
            raise ValueError(f"heads must be 'auto' or 'mean', got {heads!r}")
        self.heads = heads
        self.groups = (1, 1)

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.groups = head_groups(geometry.student_heads, geometry.teacher_heads, self.heads, key)

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        gs, gt = self.groups
        values = []
        for (qs, ks), (qt, kt) in zip(student["attention_qk"], teacher["attention_qk"], strict=True):
            scores = attention_scores(qs, ks, mask, gs)
            with torch.no_grad():
                target = attention_scores(qt, kt, mask, gt).to(scores.dtype)
            values.append(F.mse_loss(scores, target))
        return values


@register_loss("tinybert_hidden")
class TinyBertHidden(LayerwiseTerm):
    """TinyBERT hidden-state term: per mapped layer, ``MSE(W h_s, h_t)`` over every token's
    states after the student layer and its teacher layer.

    ``W`` (``fit_dense``) is one trainable Linear(d_s -> d_t) shared by all layers, as the
    released code, created only when the widths differ; it is a parameter of this term, so
    it is trained and checkpointed with the student. ``embeddings: true`` (default) adds
    the embedding outputs (layer 0 <-> layer 0, through the same ``W``); that value is added
    to the student's bottom mapped layer, so it is part of ``tinybert_hidden/L<bottom>`` and
    is left out of stages that do not distil that layer. ``mask_padding: true`` (default,
    ours) averages over real tokens only; ``false`` averages over every position as the
    released code (torch's ``mean`` over [B, S, d_t]).
    """

    needs = frozenset({"hidden", "embeddings"})

    def __init__(self, embeddings: bool = True, mask_padding: bool = True):
        super().__init__()
        self.embeddings, self.mask_padding = embeddings, mask_padding
        self.needs = type(self).needs_for({"embeddings": embeddings})
        self.fit_dense: nn.Linear | None = None
        self.bottom = None

    @classmethod
    def needs_for(cls, spec: dict) -> frozenset[str]:
        return frozenset({"hidden", "embeddings"}) if spec.get("embeddings", True) else frozenset({"hidden"})

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.bottom = min(s for s, _ in geometry.pairs)
        if geometry.student_hidden != geometry.teacher_hidden:
            self.fit_dense = nn.Linear(geometry.student_hidden, geometry.teacher_hidden)

    def state_mse(self, hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE of [B, S, d_s] student states (projected) against [B, S, d_t] teacher states."""
        if self.fit_dense is not None:
            hs = self.fit_dense(hs)  # called as a module (not through the kernel) so ZeRO-3 gathers it
        rows = hidden_rows(hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), "mse")
        if not self.mask_padding:
            return rows.mean()
        weights = mask.reshape(-1).to(rows.dtype)
        return (rows * weights).sum() / weights.sum().clamp_min(1.0)

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for (s, _), hs, ht in zip(student["pairs"], student["hidden"], teacher["hidden"], strict=True):
            value = self.state_mse(hs, ht, mask)
            if self.embeddings and s == self.bottom:
                value = value + self.state_mse(student["embeddings"], teacher["embeddings"], mask)
            values.append(value)
        return values


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


@register_loss("minilm")
class MiniLM(AttentionKL):
    """MiniLM (Wang et al., NeurIPS 2020), deep self-attention distillation of the student's
    top mapped layer only: ``KL(A_t || A_s) + KL(VR_t || VR_s)``, where A = softmax(Q K^T /
    sqrt(d_head)) and VR = softmax(V V^T / sqrt(d_head)) per head, each averaged over heads
    and real query rows (as ``attention_kl``). The value relation is ``attention_kl`` with
    (V, V) in place of (Q, K): the same formula, so the same kernels (gradients reach V
    through both slots). With the default layer map the top student layer's partner is the
    teacher's last layer, as in MiniLM. ``heads``/``kernel`` as ``attention_kl``."""

    needs = frozenset({"attention_qk", "attention_v"})

    def __init__(self, heads: str = "auto", kernel: str = "fused"):
        super().__init__(heads, kernel)
        self.top = None

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        super().bind(geometry, key)
        self.top = max(s for s, _ in geometry.pairs)

    def compares(self, pair: tuple[int, int]) -> bool:
        return pair[0] == self.top

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for s_qk, t_qk, vs, vt in zip(student["attention_qk"], teacher["attention_qk"], student["attention_v"],
                                      teacher["attention_v"], strict=True):
            attention = attention_kl(s_qk, t_qk, mask, self.groups, self.kernel)
            values.append(attention + attention_kl((vs, vs), (vt, vt), mask, self.groups, self.kernel))
        return values

# ------------------------------------------------------------------ config plumbing

RESERVED_KEYS = ("weight", "type")


def term_type(term: str, spec: dict) -> str:
    return spec.get("type", term)


def validate_loss_terms(losses: dict[str, dict], source: str) -> None:
    """Check every ``losses.<term>`` entry against its registered class's constructor."""
    if not losses:
        raise DskdError(f"{source}: `losses` is empty; configure at least one term, e.g. hard_ce: {{weight: 1.0}}")
    for term, spec in losses.items():
        kind = term_type(term, spec)
        if kind not in LOSS_REGISTRY:
            raise DskdError(
                f"{source}: `losses.{term}` has unknown loss type {kind!r}; "
                f"registered: {', '.join(sorted(LOSS_REGISTRY))} (set `type:` to pick one)"
            )
        weight = spec.get("weight")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise DskdError(f"{source}: `losses.{term}.weight` must be a non-negative number, got {weight!r}")
        params = inspect.signature(LOSS_REGISTRY[kind].__init__).parameters
        hints = typing.get_type_hints(LOSS_REGISTRY[kind].__init__)
        for key, value in spec.items():
            if key in RESERVED_KEYS:
                continue
            if key not in params or key == "self":
                allowed = [p for p in params if p != "self"] + list(RESERVED_KEYS)
                raise DskdError(
                    f"{source}: unknown key `losses.{term}.{key}` for loss {kind!r}; allowed: {', '.join(allowed)}"
                )
            expected = hints.get(key)
            if expected is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DskdError(f"{source}: `losses.{term}.{key}` must be a number, got {value!r}")
            if expected is str and not isinstance(value, str):
                raise DskdError(f"{source}: `losses.{term}.{key}` must be a string, got {value!r}")
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise DskdError(f"{source}: `losses.{term}.{key}` must be an integer, got {value!r}")
            if expected is bool and not isinstance(value, bool):
                raise DskdError(f"{source}: `losses.{term}.{key}` must be true or false, got {value!r}")
        try:
            build_term(term, spec)
        except ValueError as exc:
            raise DskdError(f"{source}: `losses.{term}`: {exc}") from None
    if not any(spec.get("weight", 0) > 0 for spec in losses.values()):
        raise DskdError(f"{source}: every term in `losses` has weight 0; give at least one a positive weight")


def build_term(term: str, spec: dict) -> LossTerm:
    kwargs = {k: v for k, v in spec.items() if k not in RESERVED_KEYS}
    return LOSS_REGISTRY[term_type(term, spec)](**kwargs)


def build_loss_terms(losses: dict[str, dict], geometry: LayerGeometry | None = None, seed: int = 0) -> nn.ModuleDict:
    """Build every configured term; layer-wise terms are bound to ``geometry``.

    Parameters a term creates are initialised from ``seed`` so every rank starts alike.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Inside the seeded block: terms may draw parameters when built (RW-KD's meta-learner).
        terms = nn.ModuleDict({term: build_term(term, spec) for term, spec in losses.items()})
        for name, term in terms.items():
            if isinstance(term, LayerwiseTerm):
                if geometry is None:
                    raise DskdError(f"`losses.{name}` compares internal layers and needs a layer map (`layer_map`)")
                term.bind(geometry, f"losses.{name}")
    return terms


from dskd import contrastive  # noqa: E402,F401  (registers `codir`; it builds on the classes above)
from dskd import reweight  # noqa: E402,F401  (registers `rw_kd`)
from dskd import universal  # noqa: E402,F401  (registers `universal_kd`)
from dskd import adversarial  # noqa: E402,F401  (registers `mate_kd`)
from dskd import glitter  # noqa: E402,F401  (registers `glitter`)
