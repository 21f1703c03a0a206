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

    @classmethod
    def needs_for(cls, spec: dict) -> frozenset[str]:
        """What a term configured by ``spec`` reads (before it is built; the teacher cache asks)."""
        return cls.needs

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
    terms = nn.ModuleDict({term: build_term(term, spec) for term, spec in losses.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, term in terms.items():
            if isinstance(term, LayerwiseTerm):
                if geometry is None:
                    raise DskdError(f"`losses.{name}` compares internal layers and needs a layer map (`layer_map`)")
                term.bind(geometry, f"losses.{name}")
    return terms


from dskd import contrastive  # noqa: E402,F401  (registers `codir`; it builds on the classes above)
