"""Run the KD-under-noisy-labels table of docs/results.md and print it.

Per task and noise rate (symmetric, seeded), a teacher is fine-tuned on the noisy training
labels (configs/noise/teacher.yaml; rate 0 reuses the clean results teacher of
bench/results.py), then 3-layer students initialised from it train on the same noisy labels
with: no KD (the reference), plain KD (0.5 CE + 0.5 KD), mitigation 1 (noise_adaptive_kd)
and mitigation 2 (small-loss selection, dropping up to 20% of the CE: the mitigations are
not told the true rate). Rate 0 reuses the results table's no-teacher and soft-KD runs.
Dev labels are clean. Completed runs are kept; every command is printed before it runs.

    python bench/noise.py --root runs/noise --results-root runs/results --tasks sst2
    python bench/noise.py --root runs/noise --tasks sst2 --table-only --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results_grid import TASKS, completed, launch, sets  # noqa: E402

from dskd.data import get_task  # noqa: E402

METHODS = {
    "no_teacher": "no KD (CE on the noisy labels alone)",
    "soft_kd": "KD (0.5 CE + 0.5 KD)",
    "noise_adaptive_kd": "mitigation 1: teacher trust grows with the estimated noise",
    "small_loss": "mitigation 2: small-loss selection (drop <= 20%)",
}
RATES = [0.0, 0.2, 0.4]


def rate_dir(root: Path, task: str, rate: float) -> Path:
    return root / task / f"r{round(rate * 100):02d}"


def teacher_for(args, task: str, rate: float) -> Path:
    if rate == 0:
        return args.results_root / task / "teacher"
    return rate_dir(args.root, task, rate) / "teacher"


def student_for(args, task: str, rate: float, method: str) -> Path:
    if rate == 0 and method in ("no_teacher", "soft_kd"):  # the same runs as the clean table's rows
        return args.results_root / task / f"L3-{method}-s1"
    return rate_dir(args.root, task, rate) / f"L3-{method}-s1"


def noise_sets(task: str, rate: float, seed: int) -> list[str]:
    return TASKS[task] + [f"data.label_noise.rate={rate}", f"data.label_noise.seed={seed}"]


def run_grid(args) -> None:
    dskd = [sys.executable, "-m", "dskd"]
    for task in args.tasks:
        for rate in args.rates:
            teacher = teacher_for(args, task, rate)
            if not completed(teacher):
                if rate == 0:
                    raise SystemExit(f"{teacher} is missing: run bench/results.py first (the clean teacher)")
                launch([*dskd, "finetune", "--config", "configs/noise/teacher.yaml", "--output", str(teacher),
                        "--auto-resume", *sets(noise_sets(task, rate, args.noise_seed))], args.threads)
            for method in args.methods:
                out = student_for(args, task, rate, method)
                if completed(out):
                    continue
                launch([*dskd, "distill", "--config", f"configs/noise/{method}.yaml", "--output", str(out),
                        "--auto-resume", *sets(noise_sets(task, rate, args.noise_seed)
                                             + [f"teacher.path={teacher}", "seed=1"])], args.threads)


def collect(args) -> dict:
    table = {}
    for task in args.tasks:
        metric = get_task(task).main_metric
        entry = {"metric": metric, "teacher": {}, "rows": {m: {} for m in args.methods}}
        for rate in args.rates:
            teacher = teacher_for(args, task, rate)
            if completed(teacher):
                entry["teacher"][rate] = json.loads((teacher / "metrics.json").read_text())[metric]
            for method in args.methods:
                out = student_for(args, task, rate, method)
                if completed(out):
                    entry["rows"][method][rate] = json.loads((out / "metrics.json").read_text())[metric]
        table[task] = entry
    return table


def markdown(table: dict, rates: list[float]) -> str:
    lines = []
    for task, entry in table.items():
        lines.append(f"**{task}** ({entry['metric']}, ×100; noise rate of the training labels)\n")
        lines.append("| model | " + " | ".join(f"{round(r * 100)}%" for r in rates) + " |")
        lines.append("|---|" + "---|" * len(rates))
        cells = [f"{100 * entry['teacher'][r]:.1f}" if r in entry["teacher"] else "-" for r in rates]
        lines.append("| teacher (fine-tuned on the noisy labels) | " + " | ".join(cells) + " |")
        for method, values in entry["rows"].items():
            cells = [f"{100 * values[r]:.1f}" if r in values else "-" for r in rates]
            lines.append(f"| 3 layers, {METHODS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "noise")
    parser.add_argument("--results-root", type=Path, default=REPO / "runs" / "results",
                        help="where bench/results.py put the clean teachers (the 0%% column)")
    parser.add_argument("--tasks", nargs="+", default=["sst2"], choices=list(TASKS))
    parser.add_argument("--rates", nargs="+", type=float, default=RATES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--noise-seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.root, args.results_root = args.root.resolve(), args.results_root.resolve()
    if not args.table_only:
        run_grid(args)
    table = collect(args)
    print(json.dumps(table, indent=1) if args.json else markdown(table, args.rates))


if __name__ == "__main__":
    main()
