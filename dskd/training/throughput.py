"""Throughput in the units a cluster user budgets with: real (non-padding) tokens per second,
model FLOP/s, and model FLOPs utilisation (MFU) against the device's peak where it is known.

Model FLOPs follow the PaLM appendix convention: per token, ``6 N + 12 L d S`` for the student
(forward and backward; N its non-embedding parameters, L layers, d width, S the sequence length)
and ``2 N + 4 L d S`` for an online teacher (forward only), plus the vocabulary projections of
the masked-LM terms at the masked share of tokens. The loss terms' own arithmetic and
recomputation are not counted (they are not model FLOPs). S is ``data.max_length``: exact for
corpus blocks, an upper bound for padded GLUE batches.
"""

from __future__ import annotations

import os

import torch

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device name; fp32 runs use the TF32 figure
# where the hardware has one. Set DSKD_PEAK_TFLOPS to override or to give a CPU's peak.
PEAKS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "V100": (125e12, 15.7e12),
}


def _encoder_flops(model, seq: int, train: bool) -> float:
    config = model.config
    embeddings = sum(p.numel() for name, p in model.named_parameters() if "embeddings" in name)
    params = sum(p.numel() for p in model.parameters()) - embeddings
    layers, width = config.num_hidden_layers, config.hidden_size
    return (6 * params + 12 * layers * width * seq) if train else (2 * params + 4 * layers * width * seq)


def flops_per_token(job) -> float:
    """Model FLOPs per real token of one training micro-step of ``job``."""
    seq = job.cfg.data.max_length
    flops = _encoder_flops(job.model, seq, train=True)
    teacher = getattr(job.teacher, "model", None)  # None: no teacher, or a cache
    if teacher is not None:
        flops += _encoder_flops(teacher, seq, train=False)
    if job.task.prediction is None and getattr(job.task, "mlm", False):
        share = job.task.mask_probability
        vocab = job.model.config.vocab_size
        flops += share * 6 * vocab * job.model.config.hidden_size
        if teacher is not None:
            flops += share * 2 * vocab * teacher.config.hidden_size
    return float(flops)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak for ``dtype`` (FLOP/s), or None where unknown."""
    override = os.environ.get("DSKD_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAKS.items():
        if key in name:
            return half if dtype in (torch.bfloat16, torch.float16) else tf32
    return None


def scalars(tokens_per_s: float, flops_per_token: float, device: torch.device, dtype: torch.dtype) -> dict:
    """``train/tokens_per_s``, ``train/model_tflops`` and, where the peak is known, ``train/mfu``."""
    achieved = tokens_per_s * flops_per_token
    out = {"train/tokens_per_s": tokens_per_s, "train/model_tflops": achieved / 1e12}
    peak = peak_flops(device, dtype)
    if peak:
        out["train/mfu"] = achieved / (peak * max(torch.distributed.get_world_size()
                                                   if torch.distributed.is_initialized() else 1, 1))
    return out
