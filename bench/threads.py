"""Thread settings of a single-process run under CPU contention: wall time of a short finetune.

Each variant is a real ``dskd finetune`` of configs/quickstart.yaml limited to ``--steps``
optimizer steps (plus its start-up and the final dev evaluation), run with the variant's
environment. The variants run in turn, round after round, so all see the same machine load;
the load average at each start is recorded. ``--contend N`` starts N busy-looping processes for
the whole benchmark (the "one other CPU job" of issue 23); without it, the machine's own load counts.

    python bench/threads.py --rounds 3 --steps 60                      # as measured in docs/benchmarks.md
    python bench/threads.py --rounds 1 --steps 60 --contend 1          # on an otherwise idle machine
    python bench/threads.py --variants "t2-passive=OMP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE" "t1=OMP_NUM_THREADS=1"

A variant is NAME=KEY=VALUE[,KEY=VALUE...]; ``KEY=`` removes KEY from the environment. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# OMP_WAIT_POLICY=ACTIVE is not libgomp's default (it spins ~300k iterations, then sleeps);
# GOMP_SPINCOUNT=300000 with the policy unset is that default, and dskd leaves both alone when either is set.
DEFAULT_VARIANTS = [
    "t2-spin=OMP_NUM_THREADS=2,OMP_WAIT_POLICY=,GOMP_SPINCOUNT=300000",
    "t2-passive=OMP_NUM_THREADS=2,OMP_WAIT_POLICY=PASSIVE,GOMP_SPINCOUNT=",
    "t1=OMP_NUM_THREADS=1,OMP_WAIT_POLICY=,GOMP_SPINCOUNT=",
]


def parse_variant(text: str) -> tuple[str, dict[str, str | None]]:
    name, _, assignments = text.partition("=")
    env: dict[str, str | None] = {}
    for item in filter(None, assignments.split(",")):
        key, _, value = item.partition("=")
        env[key] = value or None
    return name, env


def busy() -> None:
    while True:
        pass


def finetune(env_changes: dict[str, str | None], steps: int, out: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    cmd = [sys.executable, "-m", "dskd", "finetune", "--config", "configs/quickstart.yaml", "--output", str(out),
           "--overwrite", "--set", f"finetune.max_steps={steps}", "--set", "finetune.save_every=1000000",
           "--set", "finetune.progress=log"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    launch = [line for line in proc.stderr.splitlines() if line.startswith("[launch]")]
    print(f"{wall:7.1f} s  {' '.join(f'{k}={v}' for k, v in env_changes.items())}  {launch[:1]}",
          file=sys.stderr, flush=True)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--contend", type=int, default=0, help="busy-looping processes running alongside")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    hogs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.contend)]
    for hog in hogs:
        hog.start()
    work = Path(tempfile.mkdtemp(prefix="dskd-threads-"))
    walls: dict[str, list[float]] = {name: [] for name, _ in variants}
    loads: dict[str, list[float]] = {name: [] for name, _ in variants}
    try:
        for _ in range(args.rounds):
            for name, env in variants:
                loads[name].append(round(os.getloadavg()[0], 2))
                walls[name].append(round(finetune(env, args.steps, work / name), 1))
    finally:
        for hog in hogs:
            hog.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "steps": args.steps, "rounds": args.rounds, "contend": args.contend, "cpus": len(os.sched_getaffinity(0)),
        "variants": {name: {"env": env, "wall_s": walls[name], "median_s": round(statistics.median(walls[name]), 1),
                            "load_at_start": loads[name]} for name, env in variants},
    }, indent=2))


if __name__ == "__main__":
    main()
