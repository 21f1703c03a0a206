"""Run-level plugins: what a method needs from a run beyond a loss term.

A method that is only a loss term registers it with ``@register_loss`` (``dskd.losses``) and
uses the term's hooks (``bind_run``, ``bind_job``, ``before_micro_step``, ``student_extras``,
``teacher_extras``). A method that changes the run itself (the student it trains, the
teacher of a stage, the weights it evaluates and exports, state beside the checkpoint)
registers a ``Method`` here. The training loop calls every enabled method at the same
points, in registration order, and knows none of them by name.

Hooks and when they are called (every one is optional):

========================  ============================================================
``enabled(cfg, role)``    class method: is the method switched on by this config?
``check_config(cfg, src)`` class method, at load, for every registered method: refuse keys
                          that only work together (DskdError naming them)
``add_data(prep)``        preparing a job, after the data is loaded and before the
                          teacher cache is checked: add data to ``prep.extras`` (and
                          its content hash to ``prep.fingerprints``)
``build_student(s, cfg)`` return the student to train (built from the teacher or arch)
``check(job)``            the job is prepared; refuse what cannot work (DskdError)
``describe(job)``         log lines for the start of the run
``lr_factor(step, end)``  the LR factor for optimizer step ``step``, or None to leave it
                          to the run's schedule
``bind_engine(engine)``   the DeepSpeed engine exists (before any checkpoint is loaded)
``load_state(folder)``    resuming: read what ``save_state`` wrote into a checkpoint
``on_stage(run, stage)``  before the first micro-step the loop runs in a stage (also
                          the first after a resume)
``after_step(run, step)`` after each optimizer step (1-based ``step``)
``evaluating()``          a context manager the dev evaluations run inside
``save_state(folder)``    a checkpoint is being written into ``folder`` (every rank)
``after_save(run, tag)``  a checkpoint is complete
``export_state(folder)``  class method: the weights to export from a checkpoint folder,
                          or None for the trained ones (``dskd export``, ``model/``)
========================  ============================================================

``run`` is the loop's view of the running job (``dskd.training.loop.RunView``): ``job``,
``engine``, ``monitor``, ``step``, ``evaluate_teacher()`` and ``export(dest, tag)``.
``outputs`` names the folders a method writes into the run folder, so that ``--overwrite``
clears them with the rest.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

from dskd.registry import registrar

METHOD_REGISTRY: dict[str, type["Method"]] = {}


register_method = registrar(METHOD_REGISTRY, "method", "name")


class Method:
    name: ClassVar[str] = ""
    outputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, role: str):
        self.cfg, self.role = cfg, role

    @classmethod
    def enabled(cls, cfg, role: str) -> bool:
        return False

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        """At load, enabled or not: refuse a config whose keys this method needs together."""

    def add_data(self, prep) -> None:
        pass

    def build_student(self, student, cfg):
        return student

    def check(self, job) -> None:
        pass

    def describe(self, job) -> list[str]:
        return []

    def lr_factor(self, step: int, end: int) -> float | None:
        return None

    def bind_engine(self, engine) -> None:
        pass

    def load_state(self, folder) -> None:
        pass

    def on_stage(self, run, stage) -> None:
        pass

    def after_step(self, run, step: int) -> None:
        pass

    def evaluating(self):
        return contextlib.nullcontext()

    def save_state(self, folder) -> None:
        pass

    def after_save(self, run, tag: str) -> None:
        pass

    @classmethod
    def export_state(cls, folder) -> dict | None:
        return None


def enabled_methods(cfg, role: str) -> list[Method]:
    """The methods this config switches on, built, in registration order."""
    return [cls(cfg, role) for cls in METHOD_REGISTRY.values() if cls.enabled(cfg, role)]


def run_outputs() -> tuple[str, ...]:
    """Every folder a method may write into a run folder."""
    return tuple(name for cls in METHOD_REGISTRY.values() for name in cls.outputs)


def exported_state(folder) -> dict | None:
    """The weights a method exports from checkpoint ``folder`` instead of the trained ones."""
    for cls in METHOD_REGISTRY.values():
        state = cls.export_state(folder)
        if state is not None:
            return state
    return None
