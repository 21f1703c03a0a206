"""What every kernel module shares: whether Triton can run here, and the norm floor of the
cosine losses (kept in one place so the Triton and PyTorch paths agree)."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Triton is installed and can launch: a CUDA device, or the interpreter (TRITON_INTERPRET=1,
    which must be set before triton is first imported)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


EPS = 1e-8  # as torch.nn.functional.cosine_similarity
