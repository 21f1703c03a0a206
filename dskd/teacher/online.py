"""The frozen teacher run online: built or loaded once, asked only for the outputs the
configured terms need. ``dskd.teacher.cache_reader.TeacherCache`` has the same ``outputs``
interface and stands in for it in a cached run."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dskd import models
from dskd.config import TeacherConfig
from dskd.models.capture import QKCapture


@dataclass
class TeacherSide:
    """The frozen teacher and the hooks that read its mapped layers."""

    model: nn.Module
    capture: QKCapture | None = None
    source: str | None = None  # where the current model came from; None: `teacher.path` / `teacher.arch`

    def use(self, source: str | None, load) -> bool:
        """Distil from the teacher ``source`` from now on (``load(source)`` builds it, frozen);
        the previous one is released. Returns whether it changed."""
        if source == self.source:
            return False
        self.model = None  # let the old teacher go before the new one is loaded
        self.model = load(source)
        if self.capture is not None:
            layers = self.capture.layers
            self.capture.remove()
            self.capture = QKCapture(self.model, layers, "teacher")
        self.source = source
        return True

    def outputs(self, batch: dict, needs: frozenset[str], pairs: tuple[tuple[int, int], ...] = (),
                split: str = "train") -> dict:
        del split  # the online teacher computes; only the cache needs to know where to look
        return models.teacher_outputs(self.model, batch, needs, self.capture, [t for _, t in pairs])


def load_teacher(cfg, task, tokenizer, for_finetune: bool = False, head_needed_by: str | None = None) -> nn.Module:
    """The configured teacher, of the task's model class: loaded from `teacher.path`, or built from
    `teacher.arch`. ``head_needed_by``: the loss term that reads its masked-LM head (corpus jobs)."""
    if cfg.teacher.path is not None:
        return models.load_pretrained(cfg.teacher.path, task.num_labels, for_finetune=for_finetune,
                                      model_class=task.model_class, needed_by=head_needed_by, seed=cfg.seed + 1)
    return models.build_from_arch(cfg.teacher.arch, len(tokenizer), task.num_labels, tokenizer.pad_token_id,
                                  cfg.seed, "teacher.arch", task.model_class)


def cache_tokenizer(cfg, store):
    """The configured tokenizer, else the copy the teacher cache ``store`` was written with."""
    if cfg.teacher.tokenizer or cfg.teacher.path:
        return models.load_tokenizer(cfg.teacher)
    return models.load_tokenizer(TeacherConfig(tokenizer=str(store.path / "tokenizer")), key="teacher.cache")
