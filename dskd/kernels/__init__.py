"""Fused distillation loss kernels.

Each loss has one home and three implementations behind one autograd contract:

| loss | module | exact PyTorch path (CPU, any device) | Triton kernel (CUDA) |
|---|---|---|---|
| attention KL from Q/K (or teacher probabilities) | ``attention`` | chunked over query rows | online softmax over key blocks, equal head counts |
| soft-label KL with temperature | ``logits`` | chunked over rows | online log-sum-exp over class blocks |
| hidden cosine / MSE with optional projection | ``hidden`` | chunked over rows, projection recomputed | row kernel; projection by matmul per chunk |

``reference`` holds the naive formulas (every S x S / N x C tensor materialised), used
only by tests and benchmarks. Dispatch is by device: CUDA tensors take the Triton kernel
when triton is installed and the case is covered, everything else the chunked path.
``losses`` selects ``kernel: fused`` (this package) or ``kernel: naive`` per term.
"""

from __future__ import annotations

from dskd.kernels.dispatch import EPS, triton_available  # noqa: F401
from dskd.kernels.attention import attention_kl_rows, attention_log_probs, average_heads, reduce_rows
from dskd.kernels.hidden import hidden_rows
from dskd.kernels.logits import soft_kl_rows

__all__ = ["attention_kl_rows", "attention_log_probs", "average_heads", "hidden_rows", "reduce_rows",
           "soft_kl_rows", "triton_available"]
