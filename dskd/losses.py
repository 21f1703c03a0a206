"""Loss terms: one signature, one registry.

Every term is an ``nn.Module`` called as ``term(student, teacher, mask)``:

* ``student`` / ``teacher`` are dicts of model outputs: ``logits``, and for the
  layer-wise terms lists aligned with ``student["pairs"]`` (the mapped (student layer,
  teacher layer) pairs active in this stage): ``attention_qk`` (captured Q, K per
  layer, see ``dskd.capture``) and ``cls`` (the [CLS] vector after each layer). The
  teacher side also carries the batch's ground-truth ``labels``: for the hard-label
  term the data set is the teacher.
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

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        zs, zt = student["logits"].float(), teacher["logits"].float()
        if zs.shape[-1] == 1:
            return F.mse_loss(zs, zt)
        t = self.temperature
        log_ps = F.log_softmax(zs / t, dim=-1)
        log_pt = F.log_softmax(zt / t, dim=-1)
        return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (t * t)


# ------------------------------------------------- internal representations (per layer)


@dataclass(frozen=True)
class LayerGeometry:
    """What a layer-wise term must know about the two models, fixed once they are built."""

    pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer), 1-based, every mapped pair
    student_hidden: int
    teacher_hidden: int
    student_heads: int
    teacher_heads: int


class LayerwiseTerm(LossTerm):
    """A term computed for each mapped (student layer, teacher layer) pair and summed.

    The outputs it reads are lists aligned with ``student["pairs"]``: the pairs active in
    the current stage (all of them, one for a PID stage, the lower k for SID). The
    trainer logs each pair's value as ``<term>/L<student layer>``.
    """

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


def attention_log_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """log softmax(q k^T / sqrt(d) + mask) in fp32: [B, H, S, D] x2 -> [B, H, S, S].

    Padded keys get the most negative finite score rather than -inf, so a row with no
    real key (a fully padded example) stays finite instead of turning into NaN.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays (gradcheck)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(dtype).min)
    return torch.log_softmax(scores, dim=-1)


def average_heads(log_probs: torch.Tensor, group: int) -> torch.Tensor:
    """log of the mean distribution over consecutive groups of ``group`` heads."""
    if group == 1:
        return log_probs
    b, h, s, t = log_probs.shape
    grouped = log_probs.reshape(b, h // group, group, s, t)
    return torch.logsumexp(grouped, dim=2) - math.log(group)


def attention_kl(
    student_qk: tuple[torch.Tensor, torch.Tensor],
    teacher_qk: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    groups: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions, from Q and K.

    Summed over real keys, averaged over heads and over the real query rows of the
    batch (padded rows and columns contribute nothing; 0 when no row is real).
    """
    key_mask = mask.bool()
    log_s = average_heads(attention_log_probs(*student_qk, key_mask), groups[0])
    log_t = average_heads(attention_log_probs(*teacher_qk, key_mask), groups[1])
    pointwise = torch.where(key_mask[:, None, None, :], log_t.exp() * (log_t - log_s), 0.0)
    rows = mask.float()[:, None, :]
    heads = log_s.shape[1]
    return (pointwise.sum(-1) * rows).sum() / (heads * mask.float().sum().clamp_min(1.0))


@register_loss("attention_kl")
class AttentionKL(LayerwiseTerm):
    """Aguilar et al. (2020): KL(teacher || student) of self-attention distributions per mapped layer.

    The distributions are recomputed from the captured Q and K, so they are free of
    attention-dropout and need no eager attention. ``heads``: ``auto`` (per head, or
    averaged in groups when one head count divides the other) or ``mean`` (compare
    head-averaged maps); see ``head_groups``.
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
        return [
            attention_kl(s_qk, t_qk, mask, self.groups)
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

    def __init__(self):
        super().__init__()
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
                hs = self.projections[name](hs)
            values.append((1.0 - F.cosine_similarity(hs.float(), ht.float(), dim=-1, eps=1e-8)).mean())
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
    terms = nn.ModuleDict({term: build_term(term, spec) for term, spec in losses.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, term in terms.items():
            if isinstance(term, LayerwiseTerm):
                if geometry is None:
                    raise DskdError(f"`losses.{name}` compares internal layers and needs a layer map (`layer_map`)")
                term.bind(geometry, f"losses.{name}")
    return terms
