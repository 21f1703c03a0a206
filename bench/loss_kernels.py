"""Fused loss kernels against the naive formulas: time and peak memory of forward + backward.

Cases (defaults are the issue's CPU shapes):

* ``attention``: attention KL from Q/K at B=8, H=12, S=512, d=64, a quarter of the
  tokens padding. ``naive`` materialises the [B, H, S, S] maps, log-probabilities and
  KL of both sides (``dskd.kernels.reference``); ``fused`` is ``dskd.kernels`` (on CPU
  the chunked exact path; on CUDA the Triton kernel).
* ``soft_kl``: soft-label KL at N=2048 rows x C=32000 classes (an LLM vocabulary), T=2.
* ``hidden``: [CLS]-style cosine with a 256 -> 384 projection over N=16384 rows.

Time: medians over alternating rounds in this process. Peak memory: each (case, variant)
runs forward + backward once in a fresh process and reports how far its peak resident
memory (Linux ``VmHWM`` after resetting it; ``max_memory_allocated`` on CUDA) rose above the level after the
inputs were made, so allocator noise from other cases cannot leak in. Prints one JSON object.

    python bench/loss_kernels.py [--rounds 5] [--cases attention soft_kl hidden]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dskd.kernels import attention_kl_rows, hidden_rows, reduce_rows, reference, soft_kl_rows  # noqa: E402


def make_case(case: str, args, device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    if case == "attention":
        b, h, s, d = args.batch, args.heads, args.seq, args.head_dim
        mask = torch.ones(b, s, dtype=torch.long)
        mask[b // 2 :, s // 2 :] = 0
        mask = mask.to(device)
        student = (randn(b, h, s, d, grad=True), randn(b, h, s, d, grad=True))
        teacher = (randn(b, h, s, d), randn(b, h, s, d))
        runs = {
            "fused": lambda: reduce_rows(attention_kl_rows(student, teacher, mask), mask),
            "naive": lambda: reduce_rows(reference.attention_kl_rows(student, teacher, mask), mask),
        }
        return runs, list(student)
    if case == "soft_kl":
        zs, zt = randn(args.rows, args.classes, grad=True), randn(args.rows, args.classes)
        runs = {"fused": lambda: soft_kl_rows(zs, zt, 2.0).mean(),
                "naive": lambda: reference.soft_kl_rows(zs, zt, 2.0).mean()}
        return runs, [zs]
    if case == "hidden":
        hs, ht = randn(args.hidden_rows, 256, grad=True), randn(args.hidden_rows, 384)
        w, bias = randn(384, 256, grad=True), randn(384, grad=True)
        runs = {"fused": lambda: hidden_rows(hs, ht, "cosine", w, bias).mean(),
                "naive": lambda: reference.hidden_rows(hs, ht, "cosine", w, bias).mean()}
        return runs, [hs, w, bias]
    raise ValueError(case)


def step(run, inputs):
    loss = run()
    grads = torch.autograd.grad(loss, inputs)
    return loss, grads


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_child(args) -> None:
    """One (case, variant) in this fresh process: MB of peak memory above the inputs."""
    device = args.device
    runs, inputs = make_case(args.case, args, device)
    step(runs[args.variant], inputs)  # once first: one-time allocations (thread pools, caches) are not the kernel's
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(runs[args.variant], inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # ru_maxrss carries the parent's high-water mark across fork/exec; the kernel's own
        # counter for this image, reset to the current RSS, does not.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        step(runs[args.variant], inputs)
        peak = (_status_kb("VmHWM") - base) * 1024
    print(json.dumps({"peak_mb": peak / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["attention", "soft_kl", "hidden"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--hidden-rows", type=int, default=16384)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.case, args.variant = args.child
        peak_memory_child(args)
        return

    result = {"benchmark": "kernels", "device": args.device}
    for case in args.cases:
        runs, inputs = make_case(case, args, args.device)
        values = {name: float(step(run, inputs)[0].detach()) for name, run in runs.items()}  # warm-up, and agreement
        times = {name: [] for name in runs}
        for i in range(args.rounds):
            for name in runs if i % 2 == 0 else reversed(list(runs)):
                _sync(args.device)
                start = time.perf_counter()
                step(runs[name], inputs)
                _sync(args.device)
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(t) for name, t in times.items()}
        del runs, inputs
        memory = {}
        for variant in ("fused", "naive"):
            cmd = [sys.executable, __file__, "--child", case, variant, "--device", args.device, "--batch",
                   str(args.batch), "--heads", str(args.heads), "--seq", str(args.seq), "--head-dim",
                   str(args.head_dim), "--rows", str(args.rows), "--classes", str(args.classes), "--hidden-rows",
                   str(args.hidden_rows)]
            peaks = []
            for _ in range(args.memory_repeats):  # RSS-based on CPU: the median of fresh processes
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
            memory[variant] = statistics.median(peaks)
        result[case] = {
            "time_ratio_fused_over_naive": median["fused"] / median["naive"],
            "peak_memory_ratio_fused_over_naive": memory["fused"] / max(memory["naive"], 1e-9),
            "ms_median": {name: round(1000 * t, 2) for name, t in median.items()},
            "peak_mb_above_inputs": {name: round(m, 1) for name, m in memory.items()},
            "loss": values,
        }
    result["config"] = {k: v for k, v in vars(args).items() if k != "child"}
    result["machine"] = {"torch": torch.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
