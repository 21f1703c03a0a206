"""Masked-LM terms of task-agnostic distillation (corpus jobs, ``data.corpus``): the student's
masked-LM cross-entropy and soft-label KD on the teacher's masked-LM distribution (DistilBERT's
L_mlm and L_ce). Both read only the masked positions (``labels`` != -100, set by the corpus
collator) and apply the vocabulary projection chunked (``dskd.kernels.vocab``), never building
``[tokens, vocab]`` logits."""

from __future__ import annotations

import torch

from dskd.errors import DskdError
from dskd.kernels.vocab import DEFAULT_CHUNK, vocab_loss, vocab_loss_reference
from dskd.losses.base import LossTerm, _check_kernel, register_loss
from dskd.models.loading import mlm_head


class _MaskedLMTerm(LossTerm):
    """What both terms share: the heads, the masked rows, ZeRO-3's view of the tied projection."""

    needs = frozenset({"last_hidden"})
    mlm = True  # the job's models carry masked-LM heads and its inputs are masked (``uses_mlm``)

    def __init__(self, kernel: str = "fused", chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.kernel = _check_kernel(kernel)
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.chunk = chunk
        self._logs: dict[str, torch.Tensor] = {}

    def bind_job(self, job, key: str) -> None:
        if getattr(job.task, "prediction", "logits") is not None:
            raise DskdError(f"`{key}` is a masked-LM term of corpus jobs; this job distils on {job.task.name} "
                            "(set data.corpus, or drop the term)")
        _, weight, bias = mlm_head(job.model, "student")
        if job.zero_stage == 3:
            # The projection is the word-embedding table, owned by another module: ZeRO-3 gathers it
            # for this term's forward only when told so.
            import deepspeed

            for param in (weight, bias):
                if param is not None:
                    deepspeed.zero.register_external_parameter(self, param)

    def student_extras(self, model, batch: dict) -> dict:
        return {"mlm_head": mlm_head(model, "student")}

    def _rows(self, student: dict, labels: torch.Tensor):
        masked = labels != -100
        transform, weight, bias = student["mlm_head"]
        return transform(student["last_hidden"][masked]), weight, bias, labels[masked], masked

    def _loss(self, rows, t_rows=None, temperature: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 0.0):
        hidden, weight, bias, labels, _ = rows
        t_hidden, t_weight, t_bias = t_rows if t_rows is not None else (None, None, None)
        if self.kernel == "naive":
            loss, means = vocab_loss_reference(hidden, weight, bias, labels, t_hidden, t_weight, t_bias, temperature,
                                               ce_weight, kd_weight)
        else:
            loss, means = vocab_loss(hidden, weight, bias, labels, t_hidden, t_weight, t_bias, temperature, ce_weight,
                                     kd_weight, self.chunk)
        self._logs = {"ce": means[0], "accuracy": means[2], "masked": hidden.new_tensor(float(len(labels)))}
        if kd_weight:
            self._logs["kd"] = means[1]
        return loss

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return self._logs


@register_loss("mlm_ce")
class MaskedLMLoss(_MaskedLMTerm):
    """The student's masked-LM cross-entropy on the masked tokens (no teacher)."""

    uses_teacher = False

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        return self._loss(self._rows(student, teacher["labels"]))


@register_loss("mlm_kd")
class MaskedLMKD(_MaskedLMTerm):
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) over the vocabulary at every masked token, mean
    over masked tokens, plus ``hard_weight`` x the student's masked-LM CE, sharing one pass over
    the vocabulary (DistilBERT: 5 x KD + 2 x MLM, i.e. hard_weight 0.4 at weight 5). The teacher
    must have a masked-LM head; a teacher without one is refused when the job is prepared."""

    reads_teacher_head = True  # the teacher must be loaded with its masked-LM head (``teacher_head_reader``)

    def __init__(self, temperature: float = 2.0, hard_weight: float = 0.0, kernel: str = "fused",
                 chunk: int = DEFAULT_CHUNK):
        super().__init__(kernel, chunk)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if hard_weight < 0:
            raise ValueError(f"hard_weight must be non-negative, got {hard_weight}")
        self.temperature = temperature
        self.hard_weight = hard_weight

    def teacher_extras(self, teacher, batch: dict) -> dict:
        model = getattr(teacher, "model", None)
        if model is None:
            raise DskdError("`mlm_kd` needs the online teacher's masked-LM head")
        return {"mlm_head": mlm_head(model, "teacher")}

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        rows = self._rows(student, teacher["labels"])
        t_transform, t_weight, t_bias = teacher["mlm_head"]
        with torch.no_grad():
            t_hidden = t_transform(teacher["last_hidden"][rows[4]])
        return self._loss(rows, (t_hidden, t_weight, t_bias), self.temperature, self.hard_weight, 1.0)


def uses_mlm(losses: dict[str, dict]) -> bool:
    """Whether a job with these loss terms masks its inputs and needs masked-LM heads."""
    from dskd.losses.base import LOSS_REGISTRY, term_type

    return any(getattr(LOSS_REGISTRY.get(term_type(name, spec)), "mlm", False) for name, spec in losses.items())


def teacher_head_reader(losses: dict[str, dict]) -> str | None:
    """``losses.<name>`` of the first term that reads the teacher's masked-LM head, if any: the
    teacher is then required to have one (named in the error when it has not)."""
    from dskd.losses.base import LOSS_REGISTRY, term_type

    return next((f"losses.{name}" for name, spec in losses.items()
                 if getattr(LOSS_REGISTRY.get(term_type(name, spec)), "reads_teacher_head", False)), None)
