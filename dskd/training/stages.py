"""Schedule stages: the step ranges of the configured schedule, the layers each distils, the
LR schedule over them, and stages ended early by a plateau rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dskd.config import ExperimentConfig, PlateauConfig, TrainingConfig
from dskd.errors import DskdError
from dskd.losses import LayerwiseTerm


@dataclass
class Stage:
    name: str
    start: int  # first optimizer step (0-based) of the stage
    end: int  # one past its last step (with a plateau rule: the latest it may end)
    weights: dict[str, float]
    layers: tuple[int, ...] | None = None  # student layers of the layer-wise terms; None = all mapped
    plateau: PlateauConfig | None = None
    keep_best: bool = False  # end the stage with its best-on-dev weights
    teacher: str | None = None  # the teacher of this stage (`schedule[].teacher`); None: the configured one

    def progress(self, step: int) -> float:
        """Share of the stage done before optimizer step ``step`` (0-based), in [0, 1)."""
        return min(max((step - self.start) / max(self.end - self.start, 1), 0.0), 1.0)


def plan_stages(specs: list, losses: dict[str, dict], training: TrainingConfig, steps_per_epoch: int,
                mapped_layers: list[int] = ()) -> list[Stage]:
    """Turn the schedule into step ranges. No schedule: one stage of every term.

    A ``per_layer`` stage becomes one stage per mapped student layer, bottom-up, which
    share its length: ``progressive`` (PID) turns on layer k alone, ``stacked`` (SID)
    layers 1..k.
    """
    default_weights = {name: float(spec["weight"]) for name, spec in losses.items()}
    if not specs:
        total = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
        return [Stage("train", 0, total, {k: w for k, w in default_weights.items() if w > 0})]
    stages, start = [], 0
    for spec in specs:
        length = spec.steps if spec.steps is not None else max(1, math.ceil(spec.epochs * steps_per_epoch))
        weights = dict(spec.losses) if spec.losses else default_weights
        weights = {k: w for k, w in weights.items() if w > 0}
        if spec.per_layer is None:
            expanded = [(spec.name, tuple(spec.layers) if spec.layers is not None else None)]
        else:
            ordered = sorted(mapped_layers)
            expanded = [
                (f"{spec.name}-L{layer}", (layer,) if spec.per_layer == "progressive" else tuple(ordered[: i + 1]))
                for i, layer in enumerate(ordered)
            ]
        # A per-layer stage's length is shared evenly by its layers (earlier ones take the
        # remainder), so one recipe gives students of any depth the same budget.
        shares = [length // len(expanded) + (i < length % len(expanded)) for i in range(len(expanded))]
        for (name, layers), share in zip(expanded, shares, strict=True):
            share = max(share, 1)
            stages.append(Stage(name, start, start + share, weights, layers, spec.plateau, spec.keep_best,
                                spec.teacher))
            start += share
    return stages


def shorten_stage(stages: list[Stage], index: int, end: int) -> None:
    """End stage ``index`` at step ``end`` (a plateau) and move every later stage earlier."""
    shift = stages[index].end - end
    stages[index].end = end
    for stage in stages[index + 1 :]:
        stage.start -= shift
        stage.end -= shift


def lr_factor(step: int, stages: list[Stage], training: TrainingConfig, methods=()) -> float:
    """Linear warmup then linear decay to 0 (as transformers' linear schedule), over the
    whole run or restarted per stage, unless a method sets the factor (``Method.lr_factor``).
    Reads ``stages`` live, so plateau-shortened stages reshape the schedule."""
    start, end = 0, stages[-1].end
    for method in methods:
        factor = method.lr_factor(step, end)
        if factor is not None:
            return factor
    if training.lr_schedule == "per_stage":
        stage = next((s for s in stages if s.start <= step < s.end), stages[-1])
        start, end = stage.start, stage.end
    length, local = max(end - start, 1), step - start
    warmup = min(training.warmup_steps, length) if training.warmup_steps is not None \
        else int(training.warmup_ratio * length)
    if local < warmup:
        return local / max(1, warmup)
    return max(0.0, (length - local) / max(1, length - warmup))


def refresh_lr(engine) -> None:
    """Re-evaluate the LR schedule for the next step after the stage table changed: the
    scheduler computed it from the old table at the last optimizer step."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def stage_pairs(stage: Stage, pairs: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The mapped pairs a stage distils (none when it has no layer-wise term on)."""
    if stage.layers is None:
        return pairs
    return tuple(p for p in pairs if p[0] in stage.layers)


def check_stage_layers(cfg: ExperimentConfig, pairs: tuple, terms=None) -> None:
    mapped = {s for s, _ in pairs}
    whole = [name for name, t in (terms or {}).items() if isinstance(t, LayerwiseTerm) and not t.per_pair]
    for i, stage in enumerate(cfg.schedule):
        on = [name for name in whole if (stage.losses.get(name, 0) if stage.losses else cfg.losses[name]["weight"]) > 0]
        if on and (stage.layers is not None or stage.per_layer is not None):
            raise DskdError(f"`schedule[{i}]` ({stage.name}) distils only some mapped layers, but `losses.{on[0]}` "
                            "compares all of them at once; turn it off in that stage or drop `layers`/`per_layer`")
        for j, layer in enumerate(stage.layers or []):
            if layer not in mapped:
                raise DskdError(
                    f"`schedule[{i}].layers[{j}]` ({stage.name}) is student layer {layer}, which is not mapped "
                    f"to the teacher (mapped: {sorted(mapped) or 'none; configure attention_kl or cls_cosine'})"
                )
        if stage.per_layer is not None and not mapped:
            raise DskdError(f"`schedule[{i}].per_layer` ({stage.name}) needs a layer-wise loss term "
                            "(attention_kl or cls_cosine) to distil layer by layer")
