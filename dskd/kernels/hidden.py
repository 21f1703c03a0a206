"""Hidden-state cosine distance and MSE, with an optional linear projection, chunked.

Per row: ``1 - cos(W h_s + b, h_t)`` or ``mean_d (W h_s + b - h_t)²`` in fp32 (fp64 stays).
The projection is applied one chunk of rows at a time and recomputed in the backward
pass, so the projected [N, d_t] activations (the largest tensor when many tokens are
compared) are never kept. Gradients go to the student's states and to W and b; the
teacher's states are constants. The row-wise part runs as a Triton kernel on CUDA.
"""

from __future__ import annotations

import torch

from dskd.kernels.dispatch import EPS

DEFAULT_CHUNK_ROWS = 4096
KINDS = ("cosine", "mse")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def row_loss_and_grad(x: torch.Tensor, y: torch.Tensor, kind: str, want_grad: bool):
    """Per-row loss of x against y ([n, d] each) and, optionally, d loss / d x."""
    if kind == "mse":
        diff = x - y
        return diff.pow(2).mean(-1), (2.0 / x.shape[-1]) * diff if want_grad else None
    nx = x.norm(dim=-1).clamp_min(EPS)
    ny = y.norm(dim=-1).clamp_min(EPS)
    dot = (x * y).sum(-1)
    cos = dot / (nx * ny)
    if not want_grad:
        return 1.0 - cos, None
    # d(1 - cos)/dx = -(y / (|x||y|) - cos * x / |x|²)
    grad = -(y / (nx * ny)[:, None] - (cos / (nx * nx))[:, None] * x)
    return 1.0 - cos, grad


def _project(x, weight, bias):
    if weight is None:
        return x
    out = x @ weight.to(x.dtype).t()
    return out + bias.to(x.dtype) if bias is not None else out


class _HiddenRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ht, weight, bias, kind, chunk, row_fn):
        dtype = _work_dtype(hs.dtype)
        out = hs.new_empty(hs.shape[0], dtype=dtype)
        for r0 in range(0, hs.shape[0], chunk):
            rows = slice(r0, r0 + chunk)
            x = _project(hs[rows].to(dtype), weight, bias)
            out[rows] = row_fn(x, ht[rows].to(dtype), kind, False)[0]
        ctx.save_for_backward(hs, ht, weight, bias)
        ctx.kind, ctx.chunk, ctx.row_fn = kind, chunk, row_fn
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        hs, ht, weight, bias = ctx.saved_tensors
        dtype = _work_dtype(hs.dtype)
        d_hs = torch.empty(hs.shape, dtype=dtype, device=hs.device)
        d_w = torch.zeros(weight.shape, dtype=dtype, device=hs.device) if weight is not None else None
        d_b = torch.zeros(bias.shape, dtype=dtype, device=hs.device) if bias is not None else None
        for r0 in range(0, hs.shape[0], ctx.chunk):
            rows = slice(r0, r0 + ctx.chunk)
            h = hs[rows].to(dtype)
            x = _project(h, weight, bias)
            _, d_x = ctx.row_fn(x, ht[rows].to(dtype), ctx.kind, True)
            d_x = d_x * grad_rows[rows, None].to(dtype)
            if weight is None:
                d_hs[rows] = d_x
                continue
            d_hs[rows] = d_x @ weight.to(dtype)
            d_w += d_x.t() @ h
            if d_b is not None:
                d_b += d_x.sum(0)
        return (d_hs.to(hs.dtype), None, d_w.to(weight.dtype) if d_w is not None else None,
                d_b.to(bias.dtype) if d_b is not None else None, None, None, None)


def hidden_rows(hs: torch.Tensor, ht: torch.Tensor, kind: str = "cosine", weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Per-row loss [N] between student states [N, d_s] (projected by ``weight``/``bias`` when
    given) and teacher states [N, d_t]."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    from dskd.kernels.dispatch import triton_available

    row_fn = row_loss_and_grad
    if hs.is_cuda and triton_available():
        from dskd.kernels.triton_kernels import hidden_row_loss_and_grad

        row_fn = hidden_row_loss_and_grad
    return hidden_rows_with(row_fn, hs, ht, kind, weight, bias, chunk)


def hidden_rows_with(row_fn, hs, ht, kind="cosine", weight=None, bias=None, chunk: int = DEFAULT_CHUNK_ROWS):
    """``hidden_rows`` with a given row kernel (``row_loss_and_grad`` or the Triton one)."""
    return _HiddenRows.apply(hs, ht.detach(), weight, bias, kind, chunk, row_fn)
