"""Attention-distribution KL straight from Q and K, without keeping any S x S tensor.

Per query row i of compared head h (after head grouping, see ``losses.head_groups``):

    KL_i = sum_j P_ij (log P_ij - log Q_ij),
    P = mean over the teacher's group of softmax(Qt Kt^T / sqrt(d_t) + mask),
    Q = mean over the student's group of softmax(Qs Ks^T / sqrt(d_s) + mask),

summed over real keys j. ``attention_kl_rows`` returns KL_i for every row
([B, compared heads, S]), 0 for padded query rows; callers reduce (``reduce_rows``
averages over heads and real rows). Padded keys get the most negative finite score, so
fully padded examples stay finite (their rows are 0).

Two implementations with one autograd contract (gradients to the student's Q and K only;
the teacher is a constant):

* the exact PyTorch path (any device, any head grouping, fp64 for gradcheck): query rows
  in chunks; each chunk builds its [B, H, c, S] scores, and the backward pass recomputes
  them instead of saving them, so memory is O(B·H·c·S) rather than the naive path's
  several O(B·H·S²) tensors;
* the Triton kernel (CUDA, equal head counts): an online softmax over key blocks, as
  flash attention does, so neither pass ever holds more than a [BLOCK_M, BLOCK_N] tile
  (``triton_kernels.py``).

``teacher_probs`` is the second entry point: the teacher given as attention
probabilities [B, Ht, S, S] (a teacher whose cache stores maps), also chunked over rows.
"""

from __future__ import annotations

import math

import torch

DEFAULT_CHUNK_BYTES = 8 << 20  # per [B, H, c, S] fp32 temporary; a chunk keeps about four alive


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 for bf16/fp16; fp64 stays (gradcheck)


def attention_log_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """log softmax(q k^T / sqrt(d) + mask) in fp32 (fp64 stays): [B, H, S, D] x2 -> [B, H, S, S].

    Padded keys get the most negative finite score rather than -inf, so a row with no
    real key (a fully padded example) stays finite instead of turning into NaN.
    """
    dtype = _work_dtype(q.dtype)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(dtype).min)
    return torch.log_softmax(scores, dim=-1)


def average_heads(log_probs: torch.Tensor, group: int) -> torch.Tensor:
    """log of the mean distribution over consecutive groups of ``group`` heads."""
    if group == 1:
        return log_probs
    b, h, s, t = log_probs.shape
    grouped = log_probs.reshape(b, h // group, group, s, t)
    return torch.logsumexp(grouped, dim=2) - math.log(group)


def _log_probs_inplace(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, dtype) -> torch.Tensor:
    """``attention_log_probs`` without autograd, reusing one buffer (the chunked path's memory)."""
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    scores.masked_fill_(~key_mask[:, None, None, :], torch.finfo(dtype).min)
    return scores.sub_(torch.logsumexp(scores, dim=-1, keepdim=True))


def _teacher_log_probs(teacher, key_mask, rows: slice, group: int, dtype) -> torch.Tensor:
    if isinstance(teacher, tuple):
        qt, kt = teacher
        log_p = _log_probs_inplace(qt[:, :, rows], kt, key_mask, dtype)
    else:  # probabilities; log 0 = -inf only where P = 0, where the KL term is defined as 0
        log_p = teacher[:, :, rows].to(dtype).clamp_min(0).log_()
    return average_heads(log_p, group)


def chunk_rows(batch: int, heads: int, seq: int, budget: int = DEFAULT_CHUNK_BYTES) -> int:
    """Query rows per chunk so one [B, H, c, S] fp32 temporary stays within ``budget`` bytes."""
    return max(1, min(seq, budget // max(1, batch * heads * seq * 4)))


class _AttentionKLRows(torch.autograd.Function):
    """Chunked exact path: forward and backward each rebuild one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, qs, ks, qt, kt, probs, mask, gs, gt, chunk):
        teacher = (qt, kt) if probs is None else probs
        key_mask = mask.bool()
        dtype = _work_dtype(qs.dtype)
        b, hs, s, _ = qs.shape
        out = qs.new_empty((b, hs // gs, s), dtype=dtype)
        with torch.no_grad():
            for r0 in range(0, s, chunk):
                rows = slice(r0, min(r0 + chunk, s))
                log_q = average_heads(_log_probs_inplace(qs[:, :, rows], ks, key_mask, dtype), gs)
                log_p = _teacher_log_probs(teacher, key_mask, rows, gt, dtype)
                p = log_p.exp()
                pointwise = log_p.sub_(log_q).mul_(p)  # P (log P - log Q), in log_p's buffer
                del log_q
                pointwise.masked_fill_(~key_mask[:, None, None, :] | (p == 0), 0.0)
                out[:, :, rows] = pointwise.sum(-1) * key_mask[:, None, rows]
        ctx.save_for_backward(qs, ks, qt, kt, probs, mask)
        ctx.groups, ctx.chunk = (gs, gt), chunk
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        qs, ks, qt, kt, probs, mask = ctx.saved_tensors
        gs, gt = ctx.groups
        teacher = (qt, kt) if probs is None else probs
        key_mask = mask.bool()
        dtype = _work_dtype(qs.dtype)
        b, hs, s, d = qs.shape
        scale = d ** -0.5
        ks_w = ks.to(dtype)
        dq = torch.zeros(qs.shape, dtype=dtype, device=qs.device)
        dk = torch.zeros(ks.shape, dtype=dtype, device=ks.device)
        grad_rows = grad_rows.to(dtype)
        for r0 in range(0, s, ctx.chunk):
            rows = slice(r0, min(r0 + ctx.chunk, s))
            q_chunk = qs[:, :, rows].to(dtype)
            q_heads = _log_probs_inplace(q_chunk, ks_w, key_mask, dtype)  # log q, then q in place
            p = _teacher_log_probs(teacher, key_mask, rows, gt, dtype).exp_()  # [B, G, c, S]
            g = (grad_rows[:, :, rows] * key_mask[:, None, rows])[..., None]  # padded rows are constant 0
            if gs == 1:
                # d KL / d score_j = Q_j - P_j for an ungrouped student.
                d_scores = q_heads.exp_().sub_(p).mul_(g)
            else:
                # Q = mean of the group's q_h: d KL / d score_hj = q_hj (sum_k R_k q_hk - R_j) / gs, R = P / Q.
                ratio = p.div_(average_heads(q_heads, gs).exp_()).masked_fill_(~key_mask[:, None, None, :], 0.0)
                ratio = ratio.repeat_interleave(gs, dim=1)
                q_heads.exp_()
                d_scores = ratio.sub_((ratio * q_heads).sum(-1, keepdim=True)).mul_(q_heads).mul_(
                    g.repeat_interleave(gs, dim=1) / -gs)
            del p
            d_scores.masked_fill_(~key_mask[:, None, None, :], 0.0).mul_(scale)
            dq[:, :, rows] = d_scores @ ks_w
            dk += d_scores.transpose(-1, -2) @ q_chunk
        return dq.to(qs.dtype), dk.to(ks.dtype), None, None, None, None, None, None, None


def attention_kl_rows_torch(student_qk, teacher, mask, groups=(1, 1), chunk: int | None = None) -> torch.Tensor:
    """Per-row KL [B, G, S] by the chunked PyTorch path; ``teacher`` is (Qt, Kt) or probabilities."""
    qs, ks = student_qk
    qt, kt, probs = (*teacher, None) if isinstance(teacher, tuple) else (None, None, teacher)
    b, hs, s, _ = qs.shape
    chunk = chunk or chunk_rows(b, hs, s)
    return _AttentionKLRows.apply(qs, ks, qt, kt, probs, mask, groups[0], groups[1], chunk)


def triton_supported(student_qk, teacher, groups) -> bool:
    """The Triton kernel covers Q/K teachers with head-by-head comparison on CUDA tensors."""
    if not isinstance(teacher, tuple) or groups != (1, 1) or not student_qk[0].is_cuda:
        return False
    from dskd.kernels.dispatch import triton_available

    return triton_available()


def attention_kl_rows(student_qk, teacher, mask, groups=(1, 1), chunk: int | None = None) -> torch.Tensor:
    """Per-row attention KL [B, G, S]: the Triton kernel where it applies, else the chunked path."""
    if triton_supported(student_qk, teacher, groups):
        from dskd.kernels.triton_kernels import attention_kl_rows_triton

        return attention_kl_rows_triton(student_qk, teacher, mask)
    return attention_kl_rows_torch(student_qk, teacher, mask, groups, chunk)


def reduce_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over compared heads and over the batch's real query rows (0 when none is real)."""
    row_mask = mask.to(rows.dtype)
    return (rows * row_mask[:, None, :]).sum() / (rows.shape[1] * row_mask.sum().clamp_min(1.0))
