"""Loss terms: one signature, one registry.

Every term is an ``nn.Module`` called as ``term(student, teacher, mask)``:

* ``student`` / ``teacher`` are dicts of model outputs (``logits``, and later
  ``hidden_states`` / ``attentions``). The teacher side also carries the batch's
  ground-truth ``labels``: for the hard-label term the data set is the teacher.
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


# ------------------------------------------------------------------ config plumbing

RESERVED_KEYS = ("weight", "type")


def _term_type(term: str, spec: dict) -> str:
    return spec.get("type", term)


def validate_loss_terms(losses: dict[str, dict], source: str) -> None:
    """Check every ``losses.<term>`` entry against its registered class's constructor."""
    if not losses:
        raise DskdError(f"{source}: `losses` is empty; configure at least one term, e.g. hard_ce: {{weight: 1.0}}")
    for term, spec in losses.items():
        kind = _term_type(term, spec)
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
        try:
            build_term(term, spec)
        except ValueError as exc:
            raise DskdError(f"{source}: `losses.{term}`: {exc}") from None
    if not any(spec.get("weight", 0) > 0 for spec in losses.values()):
        raise DskdError(f"{source}: every term in `losses` has weight 0; give at least one a positive weight")


def build_term(term: str, spec: dict) -> LossTerm:
    kwargs = {k: v for k, v in spec.items() if k not in RESERVED_KEYS}
    return LOSS_REGISTRY[_term_type(term, spec)](**kwargs)


def build_loss_terms(losses: dict[str, dict]) -> nn.ModuleDict:
    return nn.ModuleDict({term: build_term(term, spec) for term, spec in losses.items()})
