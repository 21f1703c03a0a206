"""Soft-label KL with temperature over logits, fused and chunked over rows.

Per row: ``KL(softmax(z_t / T) || softmax(z_s / T))`` in fp32 (fp64 stays). The naive path
keeps log-probabilities of both sides and the pointwise KL, each [N, C], for the backward
pass; this one keeps only the inputs and rebuilds one chunk of rows at a time, so at LLM
vocabulary sizes its extra memory is one chunk. The gradient to the student's logits is
``(softmax(z_s/T) - softmax(z_t/T)) / T`` per unit of row KL. ``soft_kl_rows`` returns the
per-row KL; ``losses.SoftLabelKD`` takes its batch mean and multiplies by T².
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 16 << 20


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows_per_chunk(n: int, c: int, budget: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(1, min(n, budget // max(1, c * 4)))


class _SoftKLRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, temperature, chunk):
        dtype = _work_dtype(zs.dtype)
        out = zs.new_empty(zs.shape[0], dtype=dtype)
        for r0 in range(0, zs.shape[0], chunk):
            rows = slice(r0, r0 + chunk)  # forward runs under no_grad inside autograd.Function
            log_q = torch.log_softmax(zs[rows].to(dtype) / temperature, dim=-1)
            log_p = torch.log_softmax(zt[rows].to(dtype) / temperature, dim=-1)
            p = log_p.exp()
            out[rows] = log_p.sub_(log_q).mul_(p).sum(-1)
        ctx.save_for_backward(zs, zt)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        zs, zt = ctx.saved_tensors
        t = ctx.temperature
        dtype = _work_dtype(zs.dtype)
        grad = torch.empty(zs.shape, dtype=dtype, device=zs.device)
        for r0 in range(0, zs.shape[0], ctx.chunk):
            rows = slice(r0, r0 + ctx.chunk)
            q = torch.softmax(zs[rows].to(dtype) / t, dim=-1)
            q.sub_(torch.softmax(zt[rows].to(dtype) / t, dim=-1))
            grad[rows] = q.mul_(grad_rows[rows, None].to(dtype) / t)
        return grad.to(zs.dtype), None, None, None


def soft_kl_rows_torch(zs: torch.Tensor, zt: torch.Tensor, temperature: float, chunk: int | None = None):
    """Per-row KL [N] for logits [N, C] (leading dimensions flattened by the caller)."""
    return _SoftKLRows.apply(zs, zt.detach(), float(temperature), chunk or _rows_per_chunk(*zs.shape))


def soft_kl_rows(zs: torch.Tensor, zt: torch.Tensor, temperature: float, chunk: int | None = None):
    """Per-row soft-label KL: the Triton kernel on CUDA, else the chunked PyTorch path."""
    from dskd.kernels.dispatch import triton_available

    if zs.is_cuda and triton_available():
        from dskd.kernels.triton_kernels import soft_kl_rows_triton

        return soft_kl_rows_triton(zs, zt.detach(), float(temperature))
    return soft_kl_rows_torch(zs, zt, temperature, chunk)
