"""Masked-LM losses over a vocabulary, chunked so that no ``[tokens, vocab]`` tensor is ever
whole: the student's (and teacher's) output projection is applied to ``chunk`` masked tokens
at a time, and the loss and its gradients are accumulated chunk by chunk in the forward pass
(as Liger-Kernel's fused linear cross-entropy does). Memory is O(chunk x vocab) instead of
O(tokens x vocab): 4,915 masked tokens of a 32 x 1024 batch times BERT's 30,522 words are
600 MB of fp32 logits per model; a chunk of 256 rows holds a few 31 MB tensors.

One function serves both masked-LM terms (``dskd.losses.mlm``):

    loss = (ce_weight * CE(z_s, labels) + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))) / M

with ``z = h W^T + b`` per model and M the number of masked tokens. The gradient with respect to
``z_s`` is ``ce_weight * (softmax(z_s) - onehot) + kd_weight * T * (softmax(z_s/T) - softmax(z_t/T))``,
divided by M; the chain rule then gives ``h_s``, ``W_s`` and ``b_s``. The logits are computed in
fp32 whatever the run's dtype. ``vocab_loss_reference`` is the same loss with the whole logits
materialised, for tests and the benchmark. Matrix products dominate, so the path is PyTorch on
every device (a Triton kernel would add nothing to cuBLAS here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 256


class _ChunkedVocabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, temperature: float,
                ce_weight: float, kd_weight: float, chunk: int):
        m = s_hidden.shape[0]
        w_s = s_weight.float()
        b_s = s_bias.float() if s_bias is not None else None
        grad_h = torch.zeros_like(s_hidden, dtype=torch.float32)
        grad_w = torch.zeros_like(w_s)
        grad_b = torch.zeros(w_s.shape[0], dtype=torch.float32, device=w_s.device) if b_s is not None else None
        stats = torch.zeros(3, dtype=torch.float64, device=s_hidden.device)  # ce sum, kd sum, correct
        w_t = t_weight.float() if kd_weight else None
        b_t = t_bias.float() if kd_weight and t_bias is not None else None
        with torch.no_grad():
            for start in range(0, m, chunk):
                h = s_hidden[start : start + chunk].float()
                z = torch.addmm(b_s, h, w_s.t()) if b_s is not None else h @ w_s.t()
                grad_z = torch.zeros_like(z)
                # CE and accuracy are logged even when only KD is trained
                log_p = torch.log_softmax(z, dim=-1)
                target = labels[start : start + chunk]
                stats[0] -= log_p.gather(1, target[:, None]).sum().double()
                stats[2] += (z.argmax(-1) == target).sum().double()
                if ce_weight:
                    p = log_p.exp_()
                    p[torch.arange(len(target), device=p.device), target] -= 1.0
                    grad_z.add_(p, alpha=ce_weight)
                del log_p
                if kd_weight:
                    zt = t_hidden[start : start + chunk].float() @ w_t.t()
                    if b_t is not None:
                        zt += b_t
                    log_t = torch.log_softmax(zt / temperature, dim=-1)
                    log_q = torch.log_softmax(z / temperature, dim=-1)
                    p_t = log_t.exp()
                    stats[1] += (temperature ** 2 * (p_t * (log_t - log_q)).sum()).double()
                    grad_z.add_(log_q.exp_().sub_(p_t), alpha=kd_weight * temperature)
                    del zt, log_t, log_q, p_t
                grad_h[start : start + chunk] = grad_z @ w_s
                grad_w.addmm_(grad_z.t(), h)
                if grad_b is not None:
                    grad_b += grad_z.sum(0)
        scale = 1.0 / max(m, 1)
        ctx.save_for_backward(grad_h.mul_(scale).to(s_hidden.dtype), grad_w.mul_(scale).to(s_weight.dtype),
                              grad_b.mul_(scale).to(s_bias.dtype) if grad_b is not None else None)
        means = (stats * scale).float()
        loss = ce_weight * means[0] + kd_weight * means[1]
        ctx.mark_non_differentiable(means)
        return loss, means

    @staticmethod
    def backward(ctx, grad_loss, grad_means):
        del grad_means
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
                grad_b * grad_loss.to(grad_b.dtype) if grad_b is not None else None,
                None, None, None, None, None, None, None, None)


def vocab_loss(s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: torch.Tensor | None, labels: torch.Tensor,
               t_hidden: torch.Tensor | None = None, t_weight: torch.Tensor | None = None,
               t_bias: torch.Tensor | None = None, temperature: float = 1.0, ce_weight: float = 1.0,
               kd_weight: float = 0.0, chunk: int = DEFAULT_CHUNK):
    """(loss, [mean CE, mean T^2 KL, accuracy]) over the M rows of ``s_hidden`` [M, H] (the
    student's masked tokens after its head's transform), ``labels`` [M] their tokens.
    ``t_*``: the teacher's, needed when ``kd_weight`` is not 0. Gradients reach ``s_hidden``,
    ``s_weight`` and ``s_bias`` only."""
    if kd_weight and (t_hidden is None or t_weight is None):
        raise ValueError("kd_weight needs the teacher's hidden rows and output weight")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return _ChunkedVocabLoss.apply(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels,
                                   float(temperature), float(ce_weight), float(kd_weight), int(chunk))


def vocab_loss_reference(s_hidden, s_weight, s_bias, labels, t_hidden=None, t_weight=None, t_bias=None,
                         temperature: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 0.0):
    """:func:`vocab_loss` with the whole ``[M, vocab]`` logits materialised, through autograd."""
    z = F.linear(s_hidden.float(), s_weight.float(), None if s_bias is None else s_bias.float())
    ce = F.cross_entropy(z, labels, reduction="mean") if len(labels) else z.sum() * 0
    kd = z.sum() * 0
    if kd_weight:
        with torch.no_grad():
            zt = F.linear(t_hidden.float(), t_weight.float(), None if t_bias is None else t_bias.float())
        kd = temperature ** 2 * F.kl_div(torch.log_softmax(z / temperature, -1), torch.log_softmax(zt / temperature, -1),
                                         log_target=True, reduction="sum") / max(len(labels), 1)
    accuracy = (z.argmax(-1) == labels).float().mean() if len(labels) else z.new_zeros(())
    return ce_weight * ce + kd_weight * kd, torch.stack([ce.detach(), kd.detach(), accuracy])
