"""KroneckerBERT (docs/methods.md) as a method: the student's linear maps and embeddings are
factored as A ⊗ B (``dskd.models.kronecker`` holds the model), from the copied teacher weights
by nearest Kronecker product, or at random for a student built from ``student.arch``."""

from __future__ import annotations

from dskd.methods.base import Method, register_method
from dskd.models import kronecker


@register_method("kronecker")
class KroneckerStudent(Method):
    @classmethod
    def enabled(cls, cfg, role: str) -> bool:
        return role == "distill" and cfg.student.kronecker is not None

    def build_student(self, student, cfg):
        init = "nearest" if cfg.student.init_from_teacher else "random"
        return kronecker.kroneckerize(student, cfg.student.kronecker, init=init, seed=cfg.seed + 2)

    def describe(self, job) -> list[str]:
        return [kronecker.describe(job.model)]
