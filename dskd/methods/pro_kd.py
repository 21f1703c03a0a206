"""Pro-KD (docs/methods.md): distil each schedule stage from its own teacher, typically the
checkpoints the teacher passed through while it was fine-tuned.

Two run-level parts: a teacher run fine-tuned with ``trajectory: true`` exports its model at
every checkpoint to ``<run>/trajectory/<tag>/``; a distillation whose ``schedule[].teacher``
names one (a path, or ``trajectory:K``, the K-th export of ``teacher.path``) switches to it
when the stage starts, and back to the configured teacher in a stage without one.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dskd import models
from dskd.config import resolve_path
from dskd.errors import DskdError
from dskd.methods.base import Method, register_method
from dskd.runtime import dist
from dskd.teacher.online import TeacherSide, load_teacher

TRAJECTORY_DIR = "trajectory"  # `trajectory: true`: the model exported at every checkpoint
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "model_type")


def resolve_stage_teacher(cfg, value: str, key: str) -> str:
    """A stage's teacher as a path. ``trajectory:K`` is the K-th (1-based; negative counts
    from the end) model that `finetune.trajectory` exported into ``teacher.path``, by step,
    so one recipe serves every task's teacher."""
    if not value.startswith("trajectory:"):
        return value
    index = value[len("trajectory:"):]
    if not index.lstrip("-").isdigit() or int(index) == 0:
        raise DskdError(f"`{key}`: {value!r} must be trajectory:K with K = 1, 2, ... (or -1, -2, ... from the end)")
    if cfg.teacher.path is None:
        raise DskdError(f"`{key}`: {value!r} picks from the trajectory of `teacher.path`, which is not set")
    folder = Path(resolve_path(cfg.teacher.path)) / TRAJECTORY_DIR
    found = sorted(p for p in folder.iterdir() if (p / "config.json").is_file()) if folder.is_dir() else []
    k = int(index)
    if not found or not (1 <= k <= len(found) or 1 <= -k <= len(found)):
        raise DskdError(f"`{key}`: {value!r} but {folder} holds {len(found)} exported teacher(s); fine-tune the "
                        "teacher with `finetune.trajectory: true` (it exports one per checkpoint)")
    return str(found[k - 1] if k > 0 else found[k])


def check_stage_teachers(cfg, task, main_config) -> None:
    """Each stage's own teacher must exist, fit the task and have the main teacher's shape,
    which the layer map, the loss terms' projections and the tokenizer were built for.
    Checked from config files before anything runs."""
    for i, stage in enumerate(cfg.schedule):
        if stage.teacher is None:
            continue
        key = f"schedule[{i}].teacher"
        source = resolve_stage_teacher(cfg, stage.teacher, key)
        other = models.pretrained_config(source, task.num_labels, key)
        diffs = [f"{name} {getattr(other, name, None)} vs {getattr(main_config, name, None)}" for name in SHAPE_KEYS
                 if getattr(other, name, None) != getattr(main_config, name, None)]
        if diffs:
            raise DskdError(f"`{key}` ({stage.name}: {source}) differs in shape from the main teacher "
                            f"({'; '.join(diffs)}); every stage teacher must be a checkpoint of the same model")


@register_method("pro_kd")
class ProKD(Method):
    outputs = (TRAJECTORY_DIR,)

    @classmethod
    def enabled(cls, cfg, role: str) -> bool:
        training = cfg.finetune if role == "finetune" else cfg.training
        return training.trajectory or (role == "distill" and any(s.teacher is not None for s in cfg.schedule))

    def stage_teachers(self, job) -> bool:
        return self.role == "distill" and isinstance(job.teacher, TeacherSide)

    def check(self, job) -> None:
        if self.stage_teachers(job):
            check_stage_teachers(self.cfg, job.task, job.teacher.model.config)

    def on_stage(self, run, stage) -> None:
        job = run.job
        if not self.stage_teachers(job):
            return

        def load(source: str | None) -> nn.Module:
            model = (models.load_pretrained(resolve_stage_teacher(self.cfg, source, "schedule[].teacher"),
                                            job.task.num_labels, for_finetune=False, key="schedule[].teacher")
                     if source is not None else load_teacher(self.cfg, job.task, job.tokenizer))
            return models.freeze(model, job.dtype, job.device)

        if not job.teacher.use(stage.teacher, load):
            return
        scores = run.evaluate_teacher()
        described = resolve_stage_teacher(self.cfg, stage.teacher, "schedule[].teacher") if stage.teacher \
            else self.cfg.teacher.path or "the teacher built from teacher.arch"
        run.monitor.line(f"[teacher] stage {stage.name} distils from {described} "
                         f"(dev {' '.join(f'{k}={v:.4f}' for k, v in scores.items())})")
        run.monitor.scalars({f"teacher/stage/{k}": v for k, v in scores.items()}, run.step)

    def after_save(self, run, tag: str) -> None:
        training = self.cfg.finetune if self.role == "finetune" else self.cfg.training
        if not training.trajectory:
            return
        if dist.rank() == 0:
            run.export(run.job.out / TRAJECTORY_DIR / tag, tag)
        dist.barrier()
