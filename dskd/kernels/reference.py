"""Naive formulas, every intermediate materialised: what the kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dskd.kernels.attention import attention_log_probs, average_heads


def attention_kl_rows(student_qk, teacher, mask, groups=(1, 1)) -> torch.Tensor:
    """Per-row KL [B, G, S] with the full [B, H, S, S] maps, log-probabilities and KL."""
    key_mask = mask.bool()
    log_q = average_heads(attention_log_probs(*student_qk, key_mask), groups[0])
    if isinstance(teacher, tuple):
        log_p = attention_log_probs(*teacher, key_mask)
    else:
        log_p = teacher.to(log_q.dtype).log()
    log_p = average_heads(log_p, groups[1])
    p = log_p.exp()
    pointwise = torch.where(key_mask[:, None, None, :] & (p > 0), p * (log_p - log_q), 0.0)
    return pointwise.sum(-1) * mask[:, None, :].to(pointwise.dtype)  # padded query rows are 0


def soft_kl_rows(zs, zt, temperature) -> torch.Tensor:
    dtype = torch.promote_types(zs.dtype, torch.float32)
    log_q = F.log_softmax(zs.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(zt.to(dtype) / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def hidden_rows(hs, ht, kind="cosine", weight=None, bias=None) -> torch.Tensor:
    dtype = torch.promote_types(hs.dtype, torch.float32)
    x = hs.to(dtype)
    if weight is not None:
        x = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
    y = ht.to(dtype)
    if kind == "mse":
        return (x - y).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=1e-8)
