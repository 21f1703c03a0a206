"""What a verified checkpoint costs: dskd's save (DeepSpeed's files, RNG, fsync, SHA-256
manifest, rename) against DeepSpeed's bare ``save_checkpoint`` of the same engine, and the
resume check in both modes (`training.checkpoint_check: full | sizes`) against the time
DeepSpeed takes to load the checkpoint.

The model is a BERT-shaped student (default: BERT-base, 12 layers x 768, about 110M
parameters, ZeRO-0 fp32, so a checkpoint of about 1.3 GB). Saves alternate between the two
sides in rounds so both see the same machine load; the result is ratios of medians.

    python bench/checkpoint.py [--rounds 3] [--layers 12] [--hidden 768] [--root /tmp/dskd-bench-ckpt]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from common import emit  # sets the single-process CPU environment

import torch  # noqa: E402

from dskd import models  # noqa: E402
from dskd.config import ArchConfig, TrainingConfig  # noqa: E402
from dskd.training import checkpoint  # noqa: E402
from dskd.training import engine as eng  # noqa: E402


def _engine(args):
    arch = ArchConfig(layers=args.layers, hidden=args.hidden, heads=args.hidden // 64, intermediate=4 * args.hidden)
    model = models.build_from_arch(arch, 30522, 2, 0, seed=0, key="student.arch")
    training = TrainingConfig(batch_size=2, lr=1e-4)
    ds, _ = eng.load_ds_config(args.deepspeed, training)
    engine = eng.initialize(model, ds, training, lambda step: 1.0)
    batch = {"input_ids": torch.randint(0, 30522, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    loss = engine(**batch).logits.sum()  # one step, so the optimizer has its moments to save
    engine.backward(loss)
    engine.step()
    return engine


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--deepspeed", default="ds_configs/zero0_fp32.json")
    parser.add_argument("--root", default="/tmp/dskd-bench-ckpt")
    args = parser.parse_args()
    root = Path(args.root)
    eng.init_distributed()
    engine = _engine(args)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    times = {"deepspeed_save": [], "dskd_save": [], "verify_full": [], "verify_sizes": [], "deepspeed_load": []}
    engine.save_checkpoint(str(root / "warmup"), tag="t", save_latest=False)  # first-call costs, untimed
    shutil.rmtree(root / "warmup")
    step = 0
    for _ in range(args.rounds):
        step += 1
        bare = root / "bare"
        times["deepspeed_save"].append(_timed(lambda: engine.save_checkpoint(str(bare), tag="t", save_latest=False)))
        shutil.rmtree(bare)
        ours = root / "ours"
        times["dskd_save"].append(_timed(lambda: checkpoint.save(engine, ours, step, {"dskd": {}}, keep=1)))
        tag = checkpoint.tag_for(step)
        times["verify_full"].append(_timed(lambda: checkpoint.verify(ours / tag, full=True)))
        times["verify_sizes"].append(_timed(lambda: checkpoint.verify(ours / tag, full=False)))
        times["deepspeed_load"].append(_timed(lambda: engine.load_checkpoint(str(ours), tag=tag)))
    size = sum(p.stat().st_size for p in (ours / tag).iterdir())
    median = {k: statistics.median(v) for k, v in times.items()}
    shutil.rmtree(root, ignore_errors=True)
    emit({
        "bench": "checkpoint",
        "checkpoint_bytes": size,
        "params": sum(p.numel() for p in engine.module.parameters()),
        "median_s": median,
        "all_s": times,
        "dskd_save_over_deepspeed_save": median["dskd_save"] / median["deepspeed_save"],
        "verify_full_over_deepspeed_load": median["verify_full"] / median["deepspeed_load"],
        "verify_sizes_over_deepspeed_load": median["verify_sizes"] / median["deepspeed_load"],
        "sha256_gb_per_s": size / 1e9 / median["verify_full"],
    }, args)


if __name__ == "__main__":
    main()
