"""Glitter (Kamalloo, Rezagholizadeh, Ghodsi; Findings of ACL 2022): distil on the augmented
candidates where the student is furthest from the teacher.

Spec and provenance: ../shared/reference/methods.md §4.6; our choices are listed in
docs/methods.md ("Glitter"). Three parts:

1. **Candidate pool, offline** (``dskd augment``, ``dskd.methods.glitter_pool``): ``n`` candidates per training example, a
   ``datasets`` split saved with ``save_to_disk`` in ``<pool>/candidates/`` plus
   ``<pool>/manifest.json`` (generation settings, the training data it was made from, its own
   content hash). Each row: ``cid`` (the stable candidate id ``idx * n + candidate``),
   ``idx`` (the original's), ``candidate`` (0..n-1), ``op`` (how it was made), the text(s)
   and the original's label. A candidate is a pure function of (seed, idx, candidate), so the
   pool does not depend on the order of the data. Generation: masked-LM fill-in with the
   teacher's own MLM head where its folder has one, otherwise EDA-style operations without
   synonyms (random deletion, random swap, random insertion of a word of the same sentence).
2. **Teacher logits of every candidate** (``dskd cache-teacher`` with ``data.augment``): the
   cache's split ``augment`` keyed by candidate id; the pool's size and hash are part of the
   cache identity (``data.augment``), so a cache of another pool is refused.
3. **Per step** (the ``glitter`` term): the term adds the candidates of the batch's
   originals to the batch (``batch["augment"]``, ``before_micro_step``); its ``student_extras``
   hook runs the student on them (train mode, with grad, inside the DeepSpeed module so ZeRO-3
   gathers the parameters); its ``teacher_extras`` hook reads their logits (cache split ``augment``, or
   the online teacher). Per original, the ``select`` candidates with the largest
   ``KL(softmax_T(z_t) || softmax_T(z_s))`` (squared error for regression) are kept, and the
   term is ``T^2 * KL`` averaged over the kept ones (``batchmean``). The original-example
   parts of Glitter's loss are the existing ``soft_kd`` and ``hard_ce`` terms.
"""


from __future__ import annotations

import torch
import torch.nn.functional as F

from dskd.config import resolve_path
from dskd.errors import DskdError
from dskd.kernels import soft_kl_rows
from dskd.losses import LOSS_REGISTRY, LossTerm, register_loss, term_type
from dskd.methods.base import Method, register_method
from dskd.methods.glitter_pool import SPLIT, CandidatePool, Candidates
from dskd.models import model_inputs


def open_candidates(cfg, task, tokenizer, fingerprints: dict) -> Candidates | None:
    """The run's candidates (None without ``data.augment``), checked against the training data
    (``fingerprints["train"]``); records the pool in ``fingerprints[SPLIT]`` for the cache identity."""
    if cfg.data.augment is None:
        return None
    pool = CandidatePool(resolve_path(cfg.data.augment))
    pool.check_source(task.name, fingerprints["train"])
    fingerprints[SPLIT] = pool.fingerprint
    return Candidates(pool, tokenizer, cfg.data.max_length)


def attach(candidates: Candidates | None, batch: dict, tokenizer) -> dict:
    """``batch`` plus ``batch["augment"]``, its originals' candidates."""
    if candidates is None or "augment" in batch:
        return batch
    return dict(batch, augment=candidates.batch(batch["idx"], tokenizer, batch["input_ids"].device))


# ------------------------------------------------------------------- the term


def select_top(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Per original (row of ``distances`` [B, n]), the indices of its ``k`` largest distances."""
    return torch.topk(distances, min(k, distances.shape[1]), dim=1).indices


@register_loss("glitter")
class Glitter(LossTerm):
    """Glitter's augmented part: ``T^2 * KL(softmax_T(z_t) || softmax_T(z_s))`` averaged over the
    ``select`` candidates per original that are furthest from the teacher (module docstring).
    Regression: the squared error of the selected candidates. No candidates in the batch
    (evaluation, the dev batches of a plateau check): 0."""

    augments = True  # reads batch["augment"]: attached by before_micro_step, run by student_extras

    def __init__(self, temperature: float = 5.0, select: int = 2):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if select < 1:
            raise ValueError("select (the candidates kept per original, Glitter's k) must be at least 1")
        self.temperature, self.select = temperature, select
        self._logs: dict[str, torch.Tensor] = {}
        self.last_selected: torch.Tensor | None = None

    def bind_run(self, cfg, key: str) -> None:
        if cfg.data.augment is None:
            raise DskdError(f"`{key}` distils on augmented candidates; set `data.augment` to a pool written by "
                            "`dskd augment`")

        n = CandidatePool(resolve_path(cfg.data.augment)).n
        if self.select > n:
            raise DskdError(f"`{key}.select` is {self.select}, but the pool `data.augment` has {n} candidates per "
                            "example")

    def before_micro_step(self, step, batch: dict) -> dict:
        """The batch's originals' candidates go with it (the student runs on them in the module's forward)."""
        return attach(step.job.extras.get("candidates"), batch, step.tokenizer)

    def student_extras(self, model, batch: dict) -> dict:
        """The student on the candidates (train mode, with grad), inside the DeepSpeed module."""
        if "augment" not in batch:
            return {}
        return {"augment": {"logits": model(**model_inputs(batch["augment"], model))["logits"]}}

    def teacher_extras(self, teacher, batch: dict) -> dict:
        """The teacher's logits of the candidates: the cache's `augment` split (by candidate id), or online."""
        if "augment" not in batch:
            return {}
        return {"augment": teacher.outputs(batch["augment"], frozenset({"logits"}), (), SPLIT)}

    def forward(self, student: dict, teacher: dict, mask: torch.Tensor) -> torch.Tensor:
        if "augment" not in student:
            self._logs = {}
            return student["logits"].new_zeros((), dtype=torch.float32)
        zs, zt = student["augment"]["logits"], teacher["augment"]["logits"]
        b = student["logits"].shape[0]
        n, c = zs.shape[0] // b, zs.shape[-1]
        if c == 1:
            rows = (zs.float() - zt.float()).pow(2).reshape(b, n)
            scale = 1.0
        else:
            t = self.temperature
            rows = soft_kl_rows(zs.reshape(-1, c), zt.reshape(-1, c), t).reshape(b, n)
            scale = t * t
        chosen = select_top(rows.detach(), self.select)
        picked = rows.gather(1, chosen)
        self.last_selected = chosen
        self._logs = {"selected": picked.detach().mean(), "candidates": rows.detach().mean()}
        return picked.sum() / picked.numel() * scale

    def extra_logs(self) -> dict[str, torch.Tensor]:
        return dict(self._logs)


def reference_loss(zs: torch.Tensor, zt: torch.Tensor, b: int, temperature: float, select: int) -> torch.Tensor:
    """The term written out with ``F.kl_div`` (tests): zs, zt [b * n, C]."""
    n = zs.shape[0] // b
    if zs.shape[-1] == 1:
        d = F.mse_loss(zs.float(), zt.float(), reduction="none").reshape(b, n)
        return d.gather(1, d.detach().topk(select, 1).indices).mean()
    t = temperature
    d = F.kl_div(F.log_softmax(zs / t, -1), F.softmax(zt / t, -1), reduction="none").sum(-1).reshape(b, n)
    return d.gather(1, d.detach().topk(select, 1).indices).mean() * t * t


@register_method("glitter")
class GlitterPool(Method):
    """The run-level part: the candidate pool opened with the data (``data.augment``), checked
    against the training set, named in the teacher cache's identity and read as its third split."""

    @classmethod
    def enabled(cls, cfg, role: str) -> bool:
        return role == "distill" and cfg.data.augment is not None

    def add_data(self, prep) -> None:
        prep.extras["candidates"] = open_candidates(self.cfg, prep.task, prep.tokenizer, prep.fingerprints)
        prep.cache_splits.append(SPLIT)

    @classmethod
    def check_config(cls, cfg, source: str) -> None:
        """`data.augment` (the candidate pool) and the terms that read it go together."""
        readers = [name for name, spec in cfg.losses.items()
                   if getattr(LOSS_REGISTRY[term_type(name, spec)], "augments", False)]
        if cfg.data.augment is None and readers:
            raise DskdError(f"{source}: `losses.{readers[0]}` distils on augmented candidates; set `data.augment` "
                            "to a pool written by `dskd augment --config C --output DIR`")
        if cfg.data.augment is not None and not readers:
            raise DskdError(f"{source}: `data.augment` is set but no loss term reads augmented candidates; add "
                            "`glitter` to `losses` or drop `data.augment`")
