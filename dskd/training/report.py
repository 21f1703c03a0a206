"""``dskd report``: every run's hyper-parameters and final metrics in one table.

A sweep writes one run folder per setting (``slurm/sweep.sbatch``). The report reads each
folder's ``config.yaml``, ``run.json`` and ``metrics.json``, keeps the config keys whose
values differ between the runs (what the sweep varied) and prints them next to the final
dev metrics, best first. Each finished run also wrote the same hyper-parameters and metrics
to TensorBoard's hparams plugin, so ``tensorboard --logdir <sweep root>`` compares them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dskd.errors import DskdError


def flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted keys to scalar values (lists and nulls as text: the hparams plugin takes scalars only)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def find_runs(roots: list[Path]) -> list[Path]:
    runs = []
    for root in roots:
        if not root.exists():
            raise DskdError(f"dskd report: {root} does not exist")
        candidates = [root] if (root / "run.json").is_file() else sorted(p.parent for p in root.rglob("run.json"))
        runs += [c for c in candidates if (c / "config.yaml").is_file()]
    if not runs:
        raise DskdError(f"dskd report: no run folders (with run.json and config.yaml) under {', '.join(map(str, roots))}")
    return runs


def collect(roots: list[Path]) -> dict:
    rows = []
    for run in find_runs(roots):
        info = json.loads((run / "run.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        config = flatten(yaml.safe_load((run / "config.yaml").read_text()) or {})
        rows.append({"run": str(run), "status": info.get("status"), "config": config,
                     "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"},
                     "step": metrics.get("step"), "task": metrics.get("task") or info.get("task")})
    keys = sorted({k for r in rows for k in r["config"]})
    swept = [k for k in keys if len({json.dumps(r["config"].get(k)) for r in rows}) > 1 and k != "training.halt_after_steps"]
    return {"swept": swept, "runs": rows}


def format_table(report: dict) -> str:
    rows, swept = report["runs"], report["swept"]
    metric_names = sorted({m for r in rows for m in r["metrics"]})
    main = metric_names[0] if metric_names else None
    from dskd.data import GLUE_TASKS, CorpusTask

    if rows and rows[0]["task"] in GLUE_TASKS:
        main = GLUE_TASKS[rows[0]["task"]].main_metric
    elif rows and rows[0]["task"] == CorpusTask.name:
        main = next((m for m in ("mlm_accuracy", "neg_loss") if m in metric_names), main)
    rows = sorted(rows, key=lambda r: -r["metrics"].get(main, float("-inf")) if main else 0)
    header = ["run", *swept, *metric_names, "step", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [Path(r["run"]).name, *(str(r["config"].get(k)) for k in swept),
                 *(f"{100 * r['metrics'][m]:.2f}" if m in r["metrics"] else "-" for m in metric_names),
                 str(r["step"] if r["step"] is not None else "-"), str(r["status"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
