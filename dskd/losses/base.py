"""Loss terms: one signature, one registry (this module: the base classes, the registry and
the config plumbing; the terms themselves are in ``logits`` and ``layers``).

Every term is an ``nn.Module`` called as ``term(student, teacher, mask)``:

* ``student`` / ``teacher`` are dicts of model outputs: ``logits``, and for the
  layer-wise terms lists aligned with ``student["pairs"]`` (the mapped (student layer,
  teacher layer) pairs active in this stage): ``attention_qk`` (captured Q, K per
  layer, see ``dskd.models.capture``) and ``cls`` (the [CLS] vector after each layer). The
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
from typing import ClassVar

import torch
from torch import nn

from dskd.errors import DskdError
from dskd.registry import registrar

KERNELS = ("fused", "naive")


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'fused' or 'naive', got {kernel!r}")
    return kernel

LOSS_REGISTRY: dict[str, type["LossTerm"]] = {}


register_loss = registrar(LOSS_REGISTRY, "loss", "registry_name")


class LossTerm(nn.Module):
    registry_name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    uses_teacher: ClassVar[bool] = True
    # Whose gold labels the term reads: "none"; "labelled" (it skips rows labelled -100, which
    # `data.unlabeled` adds); "every" (it needs one on every row, so `data.unlabeled` is refused).
    gold_labels: ClassVar[str] = "none"
    # Fraction of the current schedule stage already done, in [0, 1): the trainer sets it
    # before every step (from the step counter, so a resumed run sees the same values).
    # Terms whose objective changes over a stage (Annealing-KD, Continuation-KD) read it.
    progress: float = 0.0

    @classmethod
    def needs_for(cls, spec: dict) -> frozenset[str]:
        """What a term configured by ``spec`` reads (before it is built; the teacher cache asks)."""
        return cls.needs

    @classmethod
    def gold_labels_for(cls, spec: dict) -> str:
        """:attr:`gold_labels` of a term configured by ``spec`` (before it is built)."""
        return cls.gold_labels

    def extra_logs(self) -> dict[str, torch.Tensor]:
        """Diagnostics of the last call, logged as ``<term>/<key>`` beside its value (not in the loss)."""
        return {}

    def bind_job(self, job, key: str) -> None:
        """Called once the run is prepared (models, data, teacher) and before anything is
        written: terms with work of their own beside the loss (a meta-learner, a generator)
        check the job here and take what they need from it. ``key`` names the term in errors."""

    def before_micro_step(self, step, batch: dict) -> dict:
        """Called before every training micro-step of a stage in which the term is on, with
        ``step`` a ``dskd.training.loop.StepContext`` (job, engine, stage, step, micro,
        tokenizer). A term may do extra work here (update a meta-learner or a generator) and return the batch with more inputs (Glitter's candidates). What it
        does must follow from the seed, the step counter and the rank only, so that a resumed
        run repeats it exactly."""
        return batch

    def student_extras(self, model: nn.Module, batch: dict) -> dict:
        """Called in the training forward, inside the module DeepSpeed wraps (so ZeRO-3 gathers
        the parameters for it), after the student's forward on ``batch``, for every term on in
        the stage: more student outputs this term reads (Glitter: the student on the batch's
        augmented candidates). Merged into the ``student`` dict the terms get."""
        return {}

    def teacher_extras(self, teacher, batch: dict) -> dict:
        """Like ``student_extras`` for the teacher side, when a term on in the stage uses the
        teacher; ``teacher`` is the online teacher or the cache (``outputs(batch, needs, pairs,
        split)``)."""
        return {}

    def bind_run(self, cfg, key: str) -> None:
        """Called once with the experiment config once the term is built (and bound), before
        anything runs: for terms that read files made for one teacher and task (Universal-KD's
        teacher probes) and must refuse others. ``key`` names the term in errors."""

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


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

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        """Create parameters / check shapes once the models are known (``key`` names the term in errors)."""

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.pair_losses(student, teacher, mask)).sum()


# ------------------------------------------------------------------ config plumbing

RESERVED_KEYS = ("weight", "type")


def term_type(term: str, spec: dict) -> str:
    return spec.get("type", term)


def check_unlabeled_rows(cfg, source: str) -> None:
    """With ``data.unlabeled`` some training rows have no gold label: refuse terms that need one on every row."""
    if not cfg.data.unlabeled:
        return
    for term, spec in cfg.losses.items():
        kind = LOSS_REGISTRY.get(term_type(term, spec))
        if kind is not None and kind.gold_labels_for(spec) == "every":
            raise DskdError(f"{source}: `losses.{term}` reads the gold label of every training row, but "
                            "`data.unlabeled` adds rows without one; drop one of the two (hard_ce and the terms on "
                            "the teacher's outputs work with unlabeled rows)")


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
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < math.inf:
            raise DskdError(f"{source}: `losses.{term}.weight` must be a finite non-negative number, got {weight!r}")
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
            if isinstance(value, float) and not math.isfinite(value):
                raise DskdError(f"{source}: `losses.{term}.{key}` must be a finite number, got {value!r}")
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


