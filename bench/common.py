"""What the benchmarks share: the single-process CPU environment, model-shape arguments,
a timer and the machine description that goes into every JSON result."""

from __future__ import annotations

import os
import platform
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for _key, _value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(_key, _value)
os.environ.setdefault("MASTER_PORT", "29571")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def add_shape_args(parser, rounds: int, steps: int, warmup: int, hidden: int, heads: int) -> None:
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--student-layers", type=int, default=3)


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float) -> None:
    """The tail of a hand-written training step: clip, step, schedule, clear."""
    import torch

    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def timed(step, n: int) -> float:
    """Mean seconds per call of ``step`` over ``n`` calls."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def emit(result: dict, args) -> None:
    """Print the result as one JSON object (with the arguments and machine) and leave."""
    import json

    print(json.dumps({**result, "config": vars(args), "machine": machine()}, indent=2))
    os._exit(0)  # skip interpreter teardown of DeepSpeed/gloo state
