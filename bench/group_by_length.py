"""training.group_by_length against random batches: epoch time and dev metric, side by side.

Real ``dskd distill`` runs of the docs/results.md soft-label KD recipe (configs/results/soft_kd.yaml:
the fine-tuned MiniLM-L6 teacher, a 3-layer student from its layers 2, 4, 6), once with random
batches and once grouped by length, per task and seed. The two modes of a (task, seed) run back to
back, their order alternating with the seed, so both see the same machine load; what counts is
the ratio grouped / random of each pair.

Training time is read from the run's TensorBoard events: the wall time between its first and last
training log lines, less the evaluations in between (checkpoints are written only at the end),
per optimizer step, times the steps of an epoch. The dev metric is the run's final one.

    python bench/group_by_length.py --teachers runs/results --root runs-bench/gbl --seeds 1 2 3
    python bench/group_by_length.py ... --train-limit 200 --epochs 1 --seeds 1   # smoke test
    python bench/group_by_length.py --teachers runs/results --steps 30    # the training steps alone

The teachers are those of bench/results.py (``ROOT/TASK/teacher``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dskd.data import get_task

TASKS = {  # bench/results.py's data settings
    "sst2": {"max_length": 64, "train_limit": 8000},
    "mrpc": {"max_length": 128, "train_limit": None},
}


def distill(args, task: str, seed: int, grouped: bool) -> dict:
    out = args.root / task / f"{'grouped' if grouped else 'random'}-s{seed}"
    limit = args.train_limit if args.train_limit is not None else TASKS[task]["train_limit"]
    sets = [f"data.task={task}", f"data.max_length={TASKS[task]['max_length']}", f"data.train_limit={json.dumps(limit)}",
            f"teacher.path={args.teachers / task / 'teacher'}", f"seed={seed}", f"training.epochs={args.epochs}",
            f"training.group_by_length={json.dumps(grouped)}", "training.save_every=1000000", "training.log_every=5"]
    cmd = [sys.executable, "-m", "dskd", "distill", "--config", "configs/results/soft_kd.yaml", "--output", str(out),
           "--overwrite", *[arg for s in sets for arg in ("--set", s)]]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{task} seed {seed}: exit {proc.returncode}")
    metrics = json.loads((out / "metrics.json").read_text())
    steps_per_epoch = int(re.search(r"(\d+) steps/epoch", proc.stderr).group(1))
    padding = re.search(r"(\d+)% of the padded tokens are real in epoch 0 \(random batches: (\d+)%\)", proc.stderr)
    result = {"task": task, "seed": seed, "grouped": grouped, "wall_s": round(wall, 1),
              "epoch_s": round(train_seconds_per_step(out / "tensorboard") * steps_per_epoch, 1),
              "metric": metrics[args.metric[task]], "best": metrics["best"][args.metric[task]]}
    if padding:
        result["real_token_share"] = {"grouped": int(padding.group(1)) / 100, "random": int(padding.group(2)) / 100}
    if not args.keep:
        shutil.rmtree(out)
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def train_seconds_per_step(tb_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    logs = events.Scalars("train/loss/total")
    evals = {e.step: e.wall_time for e in events.Scalars(next(t for t in events.Tags()["scalars"]
                                                             if t.startswith("eval/")))}
    by_step = {e.step: e.wall_time for e in logs}
    # An evaluation runs right after the training log line of its step.
    eval_time = sum(evals[s] - by_step[s] for s in evals if logs[0].step <= s < logs[-1].step and s in by_step)
    return (logs[-1].wall_time - logs[0].wall_time - eval_time) / (logs[-1].step - logs[0].step)


def step_times(args, task: str) -> dict:
    """``--steps N``: the compute alone, without start-up and evaluation. N micro-batches drawn at
    random from an epoch's random batches and N from its grouped ones, each one soft-KD training
    step (teacher forward, student forward and backward, AdamW) of its own student copy, timed
    alternately batch by batch so load drift hits both sides alike. The mean step times, times
    the (equal) number of steps per epoch, give the epoch-time ratio."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    from dskd import data, models
    from dskd.config import StudentConfig, TeacherConfig

    torch.manual_seed(0)
    spec = get_task(task)
    teacher_dir = args.teachers / task / "teacher" / "model"
    tokenizer = models.load_tokenizer(TeacherConfig(path=str(teacher_dir)))
    limit = args.train_limit if args.train_limit is not None else TASKS[task]["train_limit"]
    train = data.tokenize_split(data.load_split(spec, str(REPO.parent / "shared" / "data" / "glue"), "train", limit),
                                tokenizer, TASKS[task]["max_length"], in_memory=True)
    lengths = data.example_lengths(train)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    picks = np.random.default_rng(0)
    sides = {}
    for name, grouped in (("random", None), ("grouped", lengths)):
        batches = data.epoch_batches(len(train), 0, 1, 0, 1, 32, 1, grouped)
        student, _ = models.build_student(StudentConfig(layers=3), teacher, spec.num_labels, tokenizer.pad_token_id, 1)
        chosen = [batches[i] for i in picks.choice(len(batches), args.steps + 2, replace=False)]
        sides[name] = {"student": student.train(), "optimizer": torch.optim.AdamW(student.parameters(), lr=1e-4),
                       "batches": [data.collate([train[i] for i in b], tokenizer) for b in chosen],
                       "epoch_share": data.padding_efficiency(batches, lengths), "steps_per_epoch": len(batches),
                       "times": []}

    def step(side, batch):
        inputs = models.model_inputs(batch)
        with torch.no_grad():
            target = teacher(**inputs).logits
        logits = side["student"](**inputs).logits
        kd = F.kl_div(F.log_softmax(logits / 2, -1), F.log_softmax(target / 2, -1), reduction="batchmean",
                      log_target=True)
        (0.5 * F.cross_entropy(logits, batch["labels"]) + 2 * kd).backward()
        side["optimizer"].step()
        side["optimizer"].zero_grad(set_to_none=True)

    for i in range(args.steps + 2):
        for name in (("random", "grouped") if i % 2 == 0 else ("grouped", "random")):
            start = time.perf_counter()
            step(sides[name], sides[name]["batches"][i])
            if i >= 2:  # the first two are warm-up
                sides[name]["times"].append(time.perf_counter() - start)
    result = {"task": task, "train_examples": len(train), "steps_timed": args.steps}
    for name, side in sides.items():
        result[name] = {"step_ms_mean": round(1000 * statistics.fmean(side["times"]), 1),
                        "epoch_s": round(statistics.fmean(side["times"]) * side["steps_per_epoch"], 1),
                        "real_token_share": round(side["epoch_share"], 3)}
    result["epoch_time_ratio_grouped_over_random"] = round(result["grouped"]["epoch_s"] / result["random"]["epoch_s"], 3)
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        pairs = {}
        for r in runs:
            if r["task"] == task:
                pairs.setdefault(r["seed"], {})["grouped" if r["grouped"] else "random"] = r
        pairs = [p for p in pairs.values() if len(p) == 2]
        ratios = [p["grouped"]["epoch_s"] / p["random"]["epoch_s"] for p in pairs]
        differences = [p["grouped"]["metric"] - p["random"]["metric"] for p in pairs]

        def spread(values):
            return {"mean": round(statistics.fmean(values), 4),
                    "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None}

        summary[task] = {
            "pairs": len(pairs),
            "epoch_time_ratio_grouped_over_random": {"median": round(statistics.median(ratios), 3),
                                                     "each": [round(x, 3) for x in ratios]},
            "metric_random": spread([p["random"]["metric"] for p in pairs]),
            "metric_grouped": spread([p["grouped"]["metric"] for p in pairs]),
            "metric_difference_grouped_minus_random": {**spread(differences),
                                                       "each": [round(x, 4) for x in differences]},
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", type=Path, default=REPO / "runs" / "results",
                        help="bench/results.py's root: TASK/teacher is each task's fine-tuned teacher")
    parser.add_argument("--root", type=Path, default=REPO / "runs-bench" / "group_by_length")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--train-limit", type=int, default=None, help="instead of each task's (SST-2 8000, MRPC all)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--steps", type=int, default=None,
                        help="time N training steps of each side in one process instead of whole runs")
    args = parser.parse_args()
    if args.steps is not None:
        import torch

        torch.set_num_threads(args.threads)
        results = [step_times(args, task) for task in args.tasks]
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        print(json.dumps({"steps": results, "config": config, "machine": {"cpus": os.cpu_count(),
                          "load_avg_at_end": os.getloadavg()}}, indent=2))
        return
    args.metric = {task: get_task(task).main_metric for task in args.tasks}
    runs = []
    for i, seed in enumerate(args.seeds):
        for task in args.tasks:
            for grouped in ((False, True) if i % 2 == 0 else (True, False)):  # alternate which goes first
                runs.append(distill(args, task, seed, grouped))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(json.dumps({"summary": summarise(runs), "runs": runs, "config": config,
                      "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}}, indent=2))


if __name__ == "__main__":
    main()
