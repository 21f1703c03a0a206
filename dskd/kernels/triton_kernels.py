"""Triton kernels for the distillation losses (CUDA; on CPU through ``TRITON_INTERPRET=1``).

Importing this module imports triton. The interpreter must be chosen before that
(``TRITON_INTERPRET=1`` in the environment), which ``tests/conftest.py`` does.

All kernels accumulate in fp32. Q/K tiles are upcast to fp32 after loading; ``tl.dot``
then uses TF32 for bf16/fp16 inputs (exact for them: their mantissas fit TF32's) and
IEEE products for fp32 inputs (no TF32 rounding), so the fused losses match the PyTorch
path to fp32 rounding. (A native bf16 ``tl.dot`` would be twice as fast on tensor cores,
but the interpreter computes it wrongly, so it could not be tested on CPU.)

* Row KL (soft labels): one program per block of rows, an online log-sum-exp over
  blocks of classes for both sides, and ``A = sum exp(t - m_t) (t - s)`` rescaled on
  the fly, so ``KL = A / l_t - lse_t + lse_s`` needs one pass. The backward pass
  recomputes ``softmax`` from the saved log-sum-exps.
* Attention KL from Q/K (equal head counts): the same row KL where the "logits" of row
  i are ``q_i . k_j * scale`` over key blocks; forward per query block, backward as two
  kernels (dQ per query block, dK per key block, no atomics) that recompute the scores.
* Hidden rows: per-row cosine distance or MSE and its gradient, over blocks of features.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG = -1.0e30  # "minus infinity" that keeps inf - inf out of masked lanes


def _precision(dtype: torch.dtype) -> str:
    # Tiles are upcast to fp32 after loading. bf16 and fp16 values are exact in TF32 (10
    # mantissa bits), so TF32 products of upcast low-precision inputs are exact; fp32
    # inputs need IEEE products.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _block(n: int, low: int = 16, high: int = 128) -> int:
    return max(low, min(high, triton.next_power_of_2(n)))


# ------------------------------------------------------------------ soft-label KL


@triton.jit
def _online_kl_step(s, t, ok, m_s, l_s, m_t, l_t, acc):
    """Fold one block of student/teacher logits into the running row state: maxima m,
    sums l = sum exp(x - m), and acc = sum exp(t - m_t) (t - s), rescaled as m_t grows."""
    s = tl.where(ok, s, NEG)
    t = tl.where(ok, t, NEG)
    new_t = tl.maximum(m_t, tl.max(t, 1))
    alpha = tl.exp(m_t - new_t)
    p = tl.where(ok, tl.exp(t - new_t[:, None]), 0.0)
    l_t = l_t * alpha + tl.sum(p, 1)
    acc = acc * alpha + tl.sum(p * (t - s), 1)
    new_s = tl.maximum(m_s, tl.max(s, 1))
    q = tl.where(ok, tl.exp(s - new_s[:, None]), 0.0)
    l_s = l_s * tl.exp(m_s - new_s) + tl.sum(q, 1)
    return new_s, l_s, new_t, l_t, acc


@triton.jit
def _online_kl_start(BLOCK: tl.constexpr):
    """The empty running state of ``_online_kl_step``: (m_s, l_s, m_t, l_t, acc), maxima at NEG."""
    zeros = tl.zeros([BLOCK], tl.float32)
    return zeros + NEG, zeros, zeros + NEG, zeros, zeros


@triton.jit
def _row_kl_fwd(S, T, OUT, LSE_S, LSE_T, n_rows, n_cols, stride_s, stride_t, scale,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    m_s, l_s, m_t, l_t, acc = _online_kl_start(BLOCK_R)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=ok, other=0.0).to(tl.float32) * scale
        t = tl.load(T + rows[:, None] * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32) * scale
        m_s, l_s, m_t, l_t, acc = _online_kl_step(s, t, ok, m_s, l_s, m_t, l_t, acc)
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    kl = acc / l_t - lse_t + lse_s
    tl.store(OUT + rows, kl, mask=row_ok)
    tl.store(LSE_S + rows, lse_s, mask=row_ok)
    tl.store(LSE_T + rows, lse_t, mask=row_ok)


@triton.jit
def _row_kl_bwd(S, T, LSE_S, LSE_T, GRAD, DS, n_rows, n_cols, stride_s, stride_t, stride_d, scale,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    lse_s = tl.load(LSE_S + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(LSE_T + rows, mask=row_ok, other=0.0)
    g = tl.load(GRAD + rows, mask=row_ok, other=0.0)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols[None, :] < n_cols)
        s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=ok, other=0.0).to(tl.float32) * scale
        t = tl.load(T + rows[:, None] * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32) * scale
        q = tl.exp(s - lse_s[:, None])
        p = tl.exp(t - lse_t[:, None])
        tl.store(DS + rows[:, None] * stride_d + cols[None, :], g[:, None] * (q - p) * scale, mask=ok)


class _SoftKLRowsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, temperature):
        zs_c, zt_c = zs.contiguous(), zt.contiguous()
        n, c = zs_c.shape
        out = torch.empty(n, dtype=torch.float32, device=zs.device)
        lse_s, lse_t = torch.empty_like(out), torch.empty_like(out)
        block_r, block_c = 16, _block(c, high=1024)
        _row_kl_fwd[(triton.cdiv(n, block_r),)](zs_c, zt_c, out, lse_s, lse_t, n, c, zs_c.stride(0), zt_c.stride(0),
                                                1.0 / temperature, BLOCK_R=block_r, BLOCK_C=block_c)
        ctx.save_for_backward(zs_c, zt_c, lse_s, lse_t)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        zs, zt, lse_s, lse_t = ctx.saved_tensors
        n, c = zs.shape
        grad = torch.empty((n, c), dtype=torch.float32, device=zs.device)
        block_r, block_c = 16, _block(c, high=1024)
        _row_kl_bwd[(triton.cdiv(n, block_r),)](zs, zt, lse_s, lse_t, grad_rows.float().contiguous(), grad, n, c,
                                                zs.stride(0), zt.stride(0), grad.stride(0), 1.0 / ctx.temperature,
                                                BLOCK_R=block_r, BLOCK_C=block_c)
        return grad.to(zs.dtype), None, None


def soft_kl_rows_triton(zs: torch.Tensor, zt: torch.Tensor, temperature: float) -> torch.Tensor:
    return _SoftKLRowsTriton.apply(zs, zt, temperature)


# -------------------------------------------------------------- attention KL (Q/K)


@triton.jit
def _query_block(QS, QT, b, h, rows, row_ok, d_s, d_t, sqs_b, sqs_h, sqs_s, sqt_b, sqt_h, sqt_s, ds_, dt_):
    """Student and teacher query tiles of the rows ``rows``, upcast to fp32."""
    qs = tl.load(QS + b * sqs_b + h * sqs_h + rows[:, None] * sqs_s + ds_[None, :],
                 mask=row_ok[:, None] & (ds_[None, :] < d_s), other=0.0).to(tl.float32)
    qt = tl.load(QT + b * sqt_b + h * sqt_h + rows[:, None] * sqt_s + dt_[None, :],
                 mask=row_ok[:, None] & (dt_[None, :] < d_t), other=0.0).to(tl.float32)
    return qs, qt


@triton.jit
def _row_state(LSE_S, LSE_T, GRAD, MASK, pid_bh, b, rows, row_ok, seq):
    """What the backward kernels need per query row: both log-sum-exps and the upstream
    gradient, zero for padded rows (their KL is the constant 0)."""
    lse_s = tl.load(LSE_S + pid_bh * seq + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(LSE_T + pid_bh * seq + rows, mask=row_ok, other=0.0)
    g = tl.load(GRAD + pid_bh * seq + rows, mask=row_ok, other=0.0)
    g = tl.where(tl.load(MASK + b * seq + rows, mask=row_ok, other=0) > 0, g, 0.0)
    return lse_s, lse_t, g


@triton.jit
def _attn_kl_fwd(QS, KS, QT, KT, MASK, OUT, LSE_S, LSE_T,
                 sqs_b, sqs_h, sqs_s, sks_b, sks_h, sks_s, sqt_b, sqt_h, sqt_s, skt_b, skt_h, skt_s,
                 n_heads, seq, d_s, d_t, scale_s, scale_t,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
                 PRECISION: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds_, dt_ = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    row_ok = rows < seq
    row_real = tl.load(MASK + b * seq + rows, mask=row_ok, other=0) > 0
    qs, qt = _query_block(QS, QT, b, h, rows, row_ok, d_s, d_t, sqs_b, sqs_h, sqs_s, sqt_b, sqt_h, sqt_s, ds_, dt_)
    m_s, l_s, m_t, l_t, acc = _online_kl_start(BLOCK_M)
    for n0 in range(0, seq, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s, t, key_real, _ = _attn_scores(qs, qt, KS, KT, MASK, b, h, cols, seq, d_s, d_t, sks_b, sks_h, sks_s,
                                         skt_b, skt_h, skt_s, scale_s, scale_t, ds_, dt_, PRECISION)
        m_s, l_s, m_t, l_t, acc = _online_kl_step(s, t, key_real, m_s, l_s, m_t, l_t, acc)
    has_keys = l_t > 0
    lse_s = tl.where(has_keys, m_s + tl.log(tl.where(has_keys, l_s, 1.0)), 0.0)
    lse_t = tl.where(has_keys, m_t + tl.log(tl.where(has_keys, l_t, 1.0)), 0.0)
    kl = tl.where(row_real & has_keys, acc / tl.where(has_keys, l_t, 1.0) - lse_t + lse_s, 0.0)
    out = pid_bh * seq + rows
    tl.store(OUT + out, kl, mask=row_ok)
    tl.store(LSE_S + out, lse_s, mask=row_ok)
    tl.store(LSE_T + out, lse_t, mask=row_ok)


@triton.jit
def _attn_scores(qs, qt, KS, KT, MASK, b, h, cols, seq, d_s, d_t, sks_b, sks_h, sks_s, skt_b, skt_h, skt_s,
                 scale_s, scale_t, ds_, dt_, PRECISION: tl.constexpr):
    """Student and teacher score tiles for the key block ``cols`` (masked keys at NEG)."""
    col_ok = cols < seq
    key_real = (tl.load(MASK + b * seq + cols, mask=col_ok, other=0) > 0)[None, :]
    ks = tl.load(KS + b * sks_b + h * sks_h + cols[:, None] * sks_s + ds_[None, :],
                 mask=col_ok[:, None] & (ds_[None, :] < d_s), other=0.0).to(tl.float32)
    kt = tl.load(KT + b * skt_b + h * skt_h + cols[:, None] * skt_s + dt_[None, :],
                 mask=col_ok[:, None] & (dt_[None, :] < d_t), other=0.0).to(tl.float32)
    s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION, out_dtype=tl.float32) * scale_s
    t = tl.dot(qt, tl.trans(kt), input_precision=PRECISION, out_dtype=tl.float32) * scale_t
    return tl.where(key_real, s, NEG), tl.where(key_real, t, NEG), key_real, ks


@triton.jit
def _attn_kl_bwd(QS, KS, QT, KT, MASK, LSE_S, LSE_T, GRAD, OUT,
                 sqs_b, sqs_h, sqs_s, sks_b, sks_h, sks_s, sqt_b, sqt_h, sqt_s, skt_b, skt_h, skt_s,
                 n_heads, seq, d_s, d_t, scale_s, scale_t,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
                 PRECISION: tl.constexpr, KEYS: tl.constexpr):
    """The backward, in two launches so no atomics are needed: ``KEYS`` false, dQ of one query
    block (looping over key blocks); ``KEYS`` true, dK of one key block (looping over query blocks)."""
    pid, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    ds_, dt_ = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    if KEYS:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < seq
        grad = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
        for m0 in range(0, seq, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < seq
            qs, qt = _query_block(QS, QT, b, h, rows, row_ok, d_s, d_t, sqs_b, sqs_h, sqs_s, sqt_b, sqt_h, sqt_s,
                                  ds_, dt_)
            lse_s, lse_t, g = _row_state(LSE_S, LSE_T, GRAD, MASK, pid_bh, b, rows, row_ok, seq)
            s, t, key_real, _ = _attn_scores(qs, qt, KS, KT, MASK, b, h, cols, seq, d_s, d_t, sks_b, sks_h, sks_s,
                                             skt_b, skt_h, skt_s, scale_s, scale_t, ds_, dt_, PRECISION)
            d_scores = tl.where(key_real & row_ok[:, None],
                                g[:, None] * (tl.exp(s - lse_s[:, None]) - tl.exp(t - lse_t[:, None])), 0.0)
            grad += tl.dot(tl.trans(d_scores), qs, input_precision="ieee")
        tl.store(OUT + pid_bh * seq * d_s + cols[:, None] * d_s + ds_[None, :], grad * scale_s,
                 mask=col_ok[:, None] & (ds_[None, :] < d_s))
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seq
        qs, qt = _query_block(QS, QT, b, h, rows, row_ok, d_s, d_t, sqs_b, sqs_h, sqs_s, sqt_b, sqt_h, sqt_s,
                              ds_, dt_)
        lse_s, lse_t, g = _row_state(LSE_S, LSE_T, GRAD, MASK, pid_bh, b, rows, row_ok, seq)
        grad = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
        for n0 in range(0, seq, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            s, t, key_real, ks = _attn_scores(qs, qt, KS, KT, MASK, b, h, cols, seq, d_s, d_t, sks_b, sks_h, sks_s,
                                              skt_b, skt_h, skt_s, scale_s, scale_t, ds_, dt_, PRECISION)
            d_scores = tl.where(key_real,
                                g[:, None] * (tl.exp(s - lse_s[:, None]) - tl.exp(t - lse_t[:, None])), 0.0)
            grad += tl.dot(d_scores, ks, input_precision="ieee")
        tl.store(OUT + pid_bh * seq * d_s + rows[:, None] * d_s + ds_[None, :], grad * scale_s,
                 mask=row_ok[:, None] & (ds_[None, :] < d_s))


def _attn_args(qs, ks, qt, kt):
    strides = []
    for x in (qs, ks, qt, kt):
        strides += [x.stride(0), x.stride(1), x.stride(2)]
    return strides


def _inner_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class _AttentionKLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, qt, kt, mask):
        qs, ks, qt, kt = (_inner_contiguous(x) for x in (qs, ks, qt, kt))
        b, h, s, d_s = qs.shape
        d_t = qt.shape[-1]
        mask_i = mask.to(torch.int32).contiguous()
        out = torch.empty((b, h, s), dtype=torch.float32, device=qs.device)
        lse_s, lse_t = torch.empty_like(out), torch.empty_like(out)
        meta = dict(BLOCK_M=_block(s, high=64), BLOCK_N=_block(s, high=64), BLOCK_DS=_block(d_s, high=256),
                    BLOCK_DT=_block(d_t, high=256), PRECISION=_precision(qs.dtype))
        grid = (triton.cdiv(s, meta["BLOCK_M"]), b * h)
        _attn_kl_fwd[grid](qs, ks, qt, kt, mask_i, out, lse_s, lse_t, *_attn_args(qs, ks, qt, kt), h, s, d_s, d_t,
                           d_s ** -0.5, d_t ** -0.5, **meta)
        ctx.save_for_backward(qs, ks, qt, kt, mask_i, lse_s, lse_t)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        qs, ks, qt, kt, mask_i, lse_s, lse_t = ctx.saved_tensors
        b, h, s, d_s = qs.shape
        d_t = qt.shape[-1]
        meta = ctx.meta
        grad_rows = grad_rows.float().contiguous()
        dq = torch.empty((b, h, s, d_s), dtype=torch.float32, device=qs.device)
        dk = torch.empty_like(dq)
        args = (*_attn_args(qs, ks, qt, kt), h, s, d_s, d_t, d_s ** -0.5, d_t ** -0.5)
        for out, block, keys in ((dq, "BLOCK_M", False), (dk, "BLOCK_N", True)):
            _attn_kl_bwd[(triton.cdiv(s, meta[block]), b * h)](qs, ks, qt, kt, mask_i, lse_s, lse_t, grad_rows, out,
                                                               *args, **meta, KEYS=keys)
        return dq.to(qs.dtype), dk.to(ks.dtype), None, None, None


def attention_kl_rows_triton(student_qk, teacher_qk, mask) -> torch.Tensor:
    """Per-row KL [B, H, S] for equal head counts (head h against head h)."""
    (qs, ks), (qt, kt) = student_qk, teacher_qk
    if qs.shape[:3] != qt.shape[:3]:
        raise ValueError(f"the Triton attention KL compares heads one to one; got {tuple(qs.shape)} and {tuple(qt.shape)}")
    return _AttentionKLTriton.apply(qs, ks, qt.detach(), kt.detach(), mask)


# ------------------------------------------------------------------- hidden rows


@triton.jit
def _row_tiles(X, Y, rows, row_ok, d0, dim, stride_x, stride_y, BLOCK_D: tl.constexpr):
    """The fp32 tiles of X and Y for ``rows`` and the columns from ``d0``, and their mask."""
    cols = d0 + tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (cols[None, :] < dim)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + rows[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return x, y, cols, ok


@triton.jit
def _hidden_rows(X, Y, LOSS, DX, n_rows, dim, stride_x, stride_y, stride_d, eps,
                 COSINE: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    dot = tl.zeros([BLOCK_R], tl.float32)
    xx = tl.zeros([BLOCK_R], tl.float32)
    yy = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        x, y, cols, ok = _row_tiles(X, Y, rows, row_ok, d0, dim, stride_x, stride_y, BLOCK_D)
        if COSINE:
            dot += tl.sum(x * y, 1)
            xx += tl.sum(x * x, 1)
            yy += tl.sum(y * y, 1)
        else:
            dot += tl.sum((x - y) * (x - y), 1)
    if COSINE:
        nx = tl.maximum(tl.sqrt(xx), eps)
        ny = tl.maximum(tl.sqrt(yy), eps)
        cos = dot / (nx * ny)
        tl.store(LOSS + rows, 1.0 - cos, mask=row_ok)
    else:
        tl.store(LOSS + rows, dot / dim, mask=row_ok)
    if WANT_GRAD:
        for d0 in range(0, dim, BLOCK_D):
            x, y, cols, ok = _row_tiles(X, Y, rows, row_ok, d0, dim, stride_x, stride_y, BLOCK_D)
            if COSINE:
                grad = (cos / (nx * nx))[:, None] * x - y / (nx * ny)[:, None]
            else:
                grad = (2.0 / dim) * (x - y)
            tl.store(DX + rows[:, None] * stride_d + cols[None, :], grad, mask=ok)


def hidden_row_loss_and_grad(x: torch.Tensor, y: torch.Tensor, kind: str, want_grad: bool):
    """Triton twin of ``hidden.row_loss_and_grad`` (fp32 out)."""
    from dskd.kernels.dispatch import EPS

    x, y = _inner_contiguous(x), _inner_contiguous(y)
    n, dim = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    grad = torch.empty((n, dim), dtype=torch.float32, device=x.device) if want_grad else loss
    block_r, block_d = 16, _block(dim, high=256)
    _hidden_rows[(triton.cdiv(n, block_r),)](x, y, loss, grad, n, dim, x.stride(0), y.stride(0),
                                            grad.stride(0) if want_grad else 0, EPS, COSINE=kind == "cosine",
                                            WANT_GRAD=want_grad, BLOCK_R=block_r, BLOCK_D=block_d)
    return loss, grad if want_grad else None
