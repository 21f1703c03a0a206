"""Terms on internal representations, computed per mapped (student, teacher) layer pair:
attention KL and [CLS] cosine (Aguilar et al.), PKD, and the TinyBERT and MiniLM baselines."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from dskd.errors import DskdError
from dskd.kernels import attention_kl_rows, hidden_rows, reduce_rows, reference
from dskd.losses.base import LayerGeometry, LayerwiseTerm, _check_kernel, register_loss


def head_groups(student_heads: int, teacher_heads: int, rule: str, key: str) -> tuple[int, int]:
    """How many consecutive heads to average on each side so the counts match: (student, teacher).

    ``auto``: equal counts compare head by head; when one count divides the other, the
    larger side's heads are averaged in consecutive groups (a mean of distributions is
    a distribution). ``mean``: both sides are averaged over all heads.
    """
    if rule == "mean":
        return student_heads, teacher_heads
    if student_heads == teacher_heads:
        return 1, 1
    if teacher_heads % student_heads == 0:
        return 1, teacher_heads // student_heads
    if student_heads % teacher_heads == 0:
        return student_heads // teacher_heads, 1
    raise DskdError(
        f"`{key}`: the student has {student_heads} attention heads and the teacher {teacher_heads}; neither "
        "divides the other, so heads cannot be grouped. Set `heads: mean` to compare head-averaged attention"
    )


def attention_kl(
    student_qk: tuple[torch.Tensor, torch.Tensor],
    teacher_qk,
    mask: torch.Tensor,
    groups: tuple[int, int] = (1, 1),
    kernel: str = "fused",
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions, from Q and K.

    Summed over real keys, averaged over heads and over the real query rows of the
    batch (padded rows and columns contribute nothing; 0 when no row is real).
    ``kernel``: ``fused`` (``dskd.kernels``: chunked, or Triton on CUDA) or ``naive``
    (every [B, H, S, S] tensor materialised); both give the same numbers. ``teacher_qk``
    may also be the teacher's attention probabilities [B, H_t, S, S].
    """
    rows_fn = attention_kl_rows if kernel == "fused" else reference.attention_kl_rows
    return reduce_rows(rows_fn(student_qk, teacher_qk, mask, groups), mask)


@register_loss("attention_kl")
class AttentionKL(LayerwiseTerm):
    """Aguilar et al. (2020): KL(teacher || student) of self-attention distributions per mapped layer.

    The distributions are recomputed from the captured Q and K, so they are free of
    attention-dropout and need no eager attention. ``heads``: ``auto`` (per head, or
    averaged in groups when one head count divides the other) or ``mean`` (compare
    head-averaged maps); see ``head_groups``.
    """

    needs = frozenset({"attention_qk"})

    def __init__(self, heads: str = "auto", kernel: str = "fused"):
        super().__init__()
        if heads not in ("auto", "mean"):
            raise ValueError(f"heads must be 'auto' or 'mean', got {heads!r}")
        self.heads = heads
        self.kernel = _check_kernel(kernel)
        self.groups = (1, 1)

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.groups = head_groups(geometry.student_heads, geometry.teacher_heads, self.heads, key)

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        return [
            attention_kl(s_qk, t_qk, mask, self.groups, self.kernel)
            for s_qk, t_qk in zip(student["attention_qk"], teacher["attention_qk"], strict=True)
        ]


@register_loss("cls_cosine")
class ClsCosine(LayerwiseTerm):
    """Aguilar et al. (2020): 1 - cos between the student's and teacher's [CLS] vectors per mapped layer.

    When the hidden sizes differ, each mapped student layer gets a trainable linear map
    into the teacher's width. It is a parameter of this term, so it is trained by the
    engine's optimizer and saved in (and restored from) checkpoints with the student.
    """

    needs = frozenset({"cls"})

    def __init__(self, kernel: str = "fused"):
        super().__init__()
        self.kernel = _check_kernel(kernel)
        self.projections = nn.ModuleDict()

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        if geometry.student_hidden != geometry.teacher_hidden:
            for s, _ in geometry.pairs:
                self.projections[f"L{s}"] = nn.Linear(geometry.student_hidden, geometry.teacher_hidden)

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for (s, _), hs, ht in zip(student["pairs"], student["cls"], teacher["cls"], strict=True):
            name = f"L{s}"
            if name in self.projections:
                # Called as a module (not through the kernel's projection) so ZeRO-3 gathers it.
                hs = self.projections[name](hs)
            if self.kernel == "fused":
                values.append(hidden_rows(hs, ht, "cosine").mean())
            else:
                values.append(reference.hidden_rows(hs, ht, "cosine").mean())
        return values


@register_loss("pkd")
class PatientKD(LayerwiseTerm):
    """PKD (Sun et al., EMNLP 2019), the patient-teacher term: per mapped layer, the MSE
    between the L2-normalised [CLS] vectors of student and teacher (``normalize: false``
    compares them raw, the code's other setting). With ``exclude_last`` (default, as the
    paper) the student's top mapped layer is left to the soft-label term. The MSE averages
    over the batch and the features (torch's ``mean``, as the released code). Widths that
    differ get a trainable projection per layer, as ``cls_cosine``."""

    needs = frozenset({"cls"})

    def __init__(self, normalize: bool = True, exclude_last: bool = True):
        super().__init__()
        self.normalize, self.exclude_last = normalize, exclude_last
        self.projections = nn.ModuleDict()
        self.last = None

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.last = max(s for s, _ in geometry.pairs) if self.exclude_last else None
        if self.exclude_last and len(geometry.pairs) < 2:
            raise DskdError(f"`{key}` with `exclude_last: true` needs at least 2 mapped layers; the layer map has "
                            f"{len(geometry.pairs)}")
        if geometry.student_hidden != geometry.teacher_hidden:
            for s, _ in geometry.pairs:
                self.projections[f"L{s}"] = nn.Linear(geometry.student_hidden, geometry.teacher_hidden)

    def compares(self, pair: tuple[int, int]) -> bool:
        return pair[0] != self.last

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for (s, _), hs, ht in zip(student["pairs"], student["cls"], teacher["cls"], strict=True):
            if f"L{s}" in self.projections:
                hs = self.projections[f"L{s}"](hs)
            hs, ht = hs.float(), ht.float()
            if self.normalize:
                hs, ht = F.normalize(hs, dim=-1), F.normalize(ht, dim=-1)
            values.append(hidden_rows(hs, ht, "mse").mean())
        return values


# ------------------------------------------------------------- TinyBERT and MiniLM


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Pre-softmax attention scores ``Q K^T / sqrt(head_dim)`` in fp32 (fp64 stays), [B, H/group, S, S].

    Consecutive groups of ``group`` heads are averaged (see ``head_groups``). Entries of
    a padded key or a padded query row are 0: TinyBERT zeroes the masked entries (scores
    <= -100 after the -10000 mask, i.e. padded keys) on both sides; we zero the padded
    query rows too, which carry no information.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if group > 1:
        b, h, s, t = scores.shape
        scores = scores.reshape(b, h // group, group, s, t).mean(2)
    real = mask.bool()
    return scores.masked_fill(~(real[:, None, :, None] & real[:, None, None, :]), 0.0)


@register_loss("tinybert_attention")
class TinyBertAttention(LayerwiseTerm):
    """TinyBERT (Jiao et al., 2020) attention term: per mapped layer, the MSE between the
    pre-softmax attention scores of student and teacher, rebuilt from the captured Q and K.

    Masked entries (padded keys and padded query rows) are 0 on both sides and the MSE is
    torch's ``mean`` over all [B, H, S, S] entries, padding included, as the released code.
    Different head counts are grouped by averaging scores (``heads: auto``, when one count
    divides the other) or compared head-averaged (``heads: mean``); TinyBERT has equal counts.
    """

    needs = frozenset({"attention_qk"})

    def __init__(self, heads: str = "auto"):
        super().__init__()
        if heads not in ("auto", "mean"):
            raise ValueError(f"heads must be 'auto' or 'mean', got {heads!r}")
        self.heads = heads
        self.groups = (1, 1)

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.groups = head_groups(geometry.student_heads, geometry.teacher_heads, self.heads, key)

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        gs, gt = self.groups
        values = []
        for (qs, ks), (qt, kt) in zip(student["attention_qk"], teacher["attention_qk"], strict=True):
            scores = attention_scores(qs, ks, mask, gs)
            with torch.no_grad():
                target = attention_scores(qt, kt, mask, gt).to(scores.dtype)
            values.append(F.mse_loss(scores, target))
        return values


@register_loss("tinybert_hidden")
class TinyBertHidden(LayerwiseTerm):
    """TinyBERT hidden-state term: per mapped layer, ``MSE(W h_s, h_t)`` over every token's
    states after the student layer and its teacher layer.

    ``W`` (``fit_dense``) is one trainable Linear(d_s -> d_t) shared by all layers, as the
    released code, created only when the widths differ; it is a parameter of this term, so
    it is trained and checkpointed with the student. ``embeddings: true`` (default) adds
    the embedding outputs (layer 0 <-> layer 0, through the same ``W``); that value is added
    to the student's bottom mapped layer, so it is part of ``tinybert_hidden/L<bottom>`` and
    is left out of stages that do not distil that layer. ``mask_padding: true`` (default,
    ours) averages over real tokens only; ``false`` averages over every position as the
    released code (torch's ``mean`` over [B, S, d_t]).
    """

    needs = frozenset({"hidden", "embeddings"})

    def __init__(self, embeddings: bool = True, mask_padding: bool = True):
        super().__init__()
        self.embeddings, self.mask_padding = embeddings, mask_padding
        self.needs = type(self).needs_for({"embeddings": embeddings})
        self.fit_dense: nn.Linear | None = None
        self.bottom = None

    @classmethod
    def needs_for(cls, spec: dict) -> frozenset[str]:
        return frozenset({"hidden", "embeddings"}) if spec.get("embeddings", True) else frozenset({"hidden"})

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.bottom = min(s for s, _ in geometry.pairs)
        if geometry.student_hidden != geometry.teacher_hidden:
            self.fit_dense = nn.Linear(geometry.student_hidden, geometry.teacher_hidden)

    def state_mse(self, hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE of [B, S, d_s] student states (projected) against [B, S, d_t] teacher states."""
        if self.fit_dense is not None:
            hs = self.fit_dense(hs)  # called as a module (not through the kernel) so ZeRO-3 gathers it
        rows = hidden_rows(hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), "mse")
        if not self.mask_padding:
            return rows.mean()
        weights = mask.reshape(-1).to(rows.dtype)
        return (rows * weights).sum() / weights.sum().clamp_min(1.0)

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for (s, _), hs, ht in zip(student["pairs"], student["hidden"], teacher["hidden"], strict=True):
            value = self.state_mse(hs, ht, mask)
            if self.embeddings and s == self.bottom:
                value = value + self.state_mse(student["embeddings"], teacher["embeddings"], mask)
            values.append(value)
        return values


@register_loss("minilm")
class MiniLM(AttentionKL):
    """MiniLM (Wang et al., NeurIPS 2020), deep self-attention distillation of the student's
    top mapped layer only: ``KL(A_t || A_s) + KL(VR_t || VR_s)``, where A = softmax(Q K^T /
    sqrt(d_head)) and VR = softmax(V V^T / sqrt(d_head)) per head, each averaged over heads
    and real query rows (as ``attention_kl``). The value relation is ``attention_kl`` with
    (V, V) in place of (Q, K): the same formula, so the same kernels (gradients reach V
    through both slots). With the default layer map the top student layer's partner is the
    teacher's last layer, as in MiniLM. ``heads``/``kernel`` as ``attention_kl``."""

    needs = frozenset({"attention_qk", "attention_v"})

    def __init__(self, heads: str = "auto", kernel: str = "fused"):
        super().__init__(heads, kernel)
        self.top = None

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        super().bind(geometry, key)
        self.top = max(s for s, _ in geometry.pairs)

    def compares(self, pair: tuple[int, int]) -> bool:
        return pair[0] == self.top

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        values = []
        for s_qk, t_qk, vs, vt in zip(student["attention_qk"], teacher["attention_qk"], student["attention_v"],
                                      teacher["attention_v"], strict=True):
            attention = attention_kl(s_qk, t_qk, mask, self.groups, self.kernel)
            values.append(attention + attention_kl((vs, vs), (vt, vt), mask, self.groups, self.kernel))
        return values



@register_loss("hidden_cosine")
class HiddenCosine(LayerwiseTerm):
    """DistilBERT's cosine-embedding loss: ``1 - cos(h_s, h_t)`` for every real token's states
    after a mapped student layer and its teacher layer, averaged over real tokens. ``layers:
    top`` (default, as DistilBERT) compares the top mapped layer only; ``all`` every mapped pair.
    A trainable Linear(d_s -> d_t) per compared layer when the widths differ (trained and
    checkpointed with the student)."""

    needs = frozenset({"hidden"})

    def __init__(self, layers: str = "top", kernel: str = "fused"):
        super().__init__()
        if layers not in ("top", "all"):
            raise ValueError(f"layers must be 'top' or 'all', got {layers!r}")
        self.layers, self.kernel = layers, _check_kernel(kernel)
        self.projections = nn.ModuleDict()
        self.top = None

    def bind(self, geometry: LayerGeometry, key: str) -> None:
        self.top = max(s for s, _ in geometry.pairs)
        if geometry.student_hidden != geometry.teacher_hidden:
            for s, _ in geometry.pairs:
                if self.compares((s, 0)):
                    self.projections[f"L{s}"] = nn.Linear(geometry.student_hidden, geometry.teacher_hidden)

    def compares(self, pair: tuple[int, int]) -> bool:
        return self.layers == "all" or pair[0] == self.top

    def pair_losses(self, student: dict, teacher: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        weights = mask.reshape(-1).float()
        values = []
        for (s, _), hs, ht in zip(student["pairs"], student["hidden"], teacher["hidden"], strict=True):
            if f"L{s}" in self.projections:
                hs = self.projections[f"L{s}"](hs)  # as a module, so ZeRO-3 gathers it
            rows = (hidden_rows if self.kernel == "fused" else reference.hidden_rows)(
                hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), "cosine")
            values.append((rows.float() * weights).sum() / weights.sum().clamp_min(1.0))
        return values
