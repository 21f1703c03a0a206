"""What DeepSpeed wraps, and one micro-step through it.

The module holds the trained model plus every loss term, so terms with parameters
(projections) land in the optimizer, in ZeRO partitioning and in checkpoints. Losses are
computed inside ``forward`` so that ZeRO-3 gathers those parameters like any other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dskd import models
from dskd.losses import LayerwiseTerm
from dskd.models.capture import QKCapture, forward_with_layers

PER_PAIR_KEYS = ("pairs", "cls", "mean", "hidden", "attention_qk", "attention_v")  # lists aligned with `pairs`


class DistillationModule(nn.Module):
    """The trained model and the loss terms (``nn.ModuleDict``), as one module."""

    def __init__(self, model: nn.Module, terms: nn.ModuleDict, needs: frozenset[str], capture: QKCapture | None = None):
        super().__init__()
        self.model = model
        self.terms = terms
        self.needs = needs
        self.capture = capture  # hooks on the model's mapped layers (a plain attribute, not a module)

    def set_progress(self, fraction: float) -> None:
        """Tell every term how much of the current stage is done (see ``LossTerm.progress``)."""
        for term in self.terms.values():
            term.progress = fraction

    def forward(self, batch: dict, teacher: dict | None = None, weights: dict[str, float] | None = None,
                pairs: tuple[tuple[int, int], ...] = (), split: str = "train"):
        """Without ``weights``: the student's outputs (for ``pairs``, its layer-wise ones too).
        With them: the weighted total and each term's value (layer-wise terms also per pair).
        ``split`` tells terms keyed by training index (a memory bank) where the batch comes from."""
        student = forward_with_layers(self.model, models.model_inputs(batch), self.needs, self.capture,
                                      [s for s, _ in pairs])
        student["pairs"] = pairs
        if weights is None:
            return student
        for name in weights:  # more student outputs a term reads (`LossTerm.student_extras`)
            student.update(self.terms[name].student_extras(self.model, batch))
        targets = dict(teacher or {}, labels=batch.get("labels"), idx=batch.get("idx"), split=split)
        mask = batch["attention_mask"]
        values = {}
        for name in weights:
            term = self.terms[name]
            if isinstance(term, LayerwiseTerm) and term.per_pair:
                keep = [i for i, pair in enumerate(pairs) if term.compares(pair)]
                if not keep:  # none of this stage's layers is one the term compares
                    values[name] = mask.new_zeros((), dtype=torch.float32)
                    continue
                parts = term.pair_losses(_pick(student, keep), _pick(targets, keep), mask)
                values[name] = torch.stack(parts).sum()
                values.update({f"{name}/L{pairs[i][0]}": part for i, part in zip(keep, parts, strict=True)})
            else:
                values[name] = term(student, targets, mask)
                values.update({f"{name}/{key}": value for key, value in term.extra_logs().items()})
        total = sum(weight * values[name] for name, weight in weights.items())
        return total, values


def _pick(outputs: dict, keep: list[int]) -> dict:
    """``outputs`` with its per-pair lists (and ``pairs``) reduced to the positions ``keep``."""
    picked = dict(outputs)
    for key, value in outputs.items():
        if isinstance(value, (list, tuple)) and key in PER_PAIR_KEYS:
            picked[key] = type(value)(value[i] for i in keep) if key == "pairs" else [value[i] for i in keep]
    return picked


def losses_on(engine, teacher, batch: dict, weights: dict[str, float], pairs, split: str = "train"):
    """Teacher outputs (if a term in ``weights`` uses them), then the student's weighted losses."""
    module = engine.module
    if not any(isinstance(module.terms[name], LayerwiseTerm) for name in weights):
        pairs = ()
    teacher_out = None
    if teacher is not None and any(module.terms[name].uses_teacher for name in weights):
        teacher_out = teacher.outputs(batch, module.needs, pairs, split)
        for name in weights:  # more teacher outputs a term reads (`LossTerm.teacher_extras`)
            teacher_out.update(module.terms[name].teacher_extras(teacher, batch))
    return engine(batch, teacher_out, weights, pairs, split)


class StepResult(NamedTuple):
    total: torch.Tensor  # the weighted loss of the micro-step
    values: dict  # each term's loss (and per-layer parts)
    grad_norm: torch.Tensor | float | None  # at an accumulation boundary: the gradients' global norm, before clipping


def train_step(engine, teacher, batch: dict, weights: dict[str, float], pairs=(), grad_norm: bool = False
               ) -> StepResult:
    """One micro-step: frozen teacher forward (if a term in this stage uses it), student
    forward with the weighted loss terms, backward, and DeepSpeed's step (which applies
    the optimizer only at an accumulation boundary). ``grad_norm``: this step is logged."""
    total, values = losses_on(engine, teacher, batch, weights, pairs)
    return StepResult(total, values, backward_and_step(engine, total, grad_norm))


def backward_and_step(engine, loss: torch.Tensor, grad_norm: bool = True):
    """DeepSpeed's backward and step; at an accumulation boundary, the global norm of the
    gradients before clipping (else None). ``grad_norm`` False skips the one case where that
    norm costs a pass over the gradients."""
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    norm = None
    if boundary and grad_norm and not hasattr(engine.optimizer, "_global_grad_norm"):
        # A plain torch optimizer (ZeRO-0, fp32): DeepSpeed clips without keeping the norm, and
        # zeroes the gradients in step(). They are already averaged over ranks here, so the
        # local norm is the global one; computed for logged steps only, it stays on the device.
        norm = torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None])
    engine.step()
    if boundary and norm is None:
        norm = engine.get_global_grad_norm()
    return norm
