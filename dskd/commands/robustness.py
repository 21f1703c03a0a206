"""``dskd robustness``: models against the task's dev set, out-of-domain text and adversarial
sets, in one table (the Combined-KD paper's framework: in-domain, out-of-domain, adversarial).

Every model (a dskd run folder, an exported folder, a teacher) is scored with its own tokenizer
on every set. Sets: ``dev`` (the config's ``data.path`` dev split), the sets shipped for the
task (``dskd.data.robustness``), and any ``--eval-file NAME=PATH`` with an optional label map.
The table is written as ``robustness.md`` and ``robustness.json`` in ``--output``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dskd.errors import DskdError


def parse_named(values: list[str], what: str) -> dict[str, str]:
    """``["imdb=path", ...]`` (or ``NAME:map`` with ``sep=":"``) -> {name: value}."""
    out = {}
    for value in values or ():
        sep = "=" if what == "--eval-file" else ":"
        if sep not in value:
            example = "NAME=PATH" if sep == "=" else "NAME:FILE_LABEL=TASK_LABEL,..."
            raise DskdError(f"{what} {value!r}: expected {example}")
        name, rest = value.split(sep, 1)
        out[name.strip()] = rest.strip()
    return out


def build_sets(task, dev_file: Path, root: Path, wanted: list[str] | None, extra: dict[str, str],
               label_maps: dict[str, str]):
    """The evaluation sets, in order: dev, the shipped ones, then ``--eval-file`` ones; only
    ``wanted`` (names) when given."""
    from dskd.data.robustness import EvalSet, parse_label_map, shipped_sets

    sets = [EvalSet("dev", "in-domain", dev_file)] + shipped_sets(task, root)
    sets += [EvalSet(name, "out-of-domain", Path(path)) for name, path in extra.items()]
    known = [s.name for s in sets]
    for name in label_maps:
        if name not in known:
            raise DskdError(f"--label-map {name}: no evaluation set of that name (sets: {', '.join(known)})")
    sets = [EvalSet(s.name, s.kind, s.file, parse_label_map(label_maps[s.name]), s.clean_html)
            if s.name in label_maps else s for s in sets]
    if wanted:
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise DskdError(f"--sets {', '.join(unknown)}: not a set of task {task.name} (sets: {', '.join(known)}; "
                            "add others with --eval-file NAME=PATH)")
        sets = [s for s in sets if s.name in wanted]
    return sets


def load_model(path: str, task):
    """(name, model, tokenizer) of a run folder or model folder; refuses a tokenizer whose ids
    the model's embedding table cannot hold."""
    from dskd import models
    from dskd.config import TeacherConfig

    tokenizer = models.load_tokenizer(TeacherConfig(path=path), key="--models")
    model = models.load_pretrained(path, task.num_labels, for_finetune=False, key="--models").eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise DskdError(f"--models {path}: its tokenizer has {len(tokenizer)} tokens but the model's embedding table "
                        f"{vocab} rows: they are not one model's; give a folder holding both (a run's model/)")
    return Path(path).name or path, model, tokenizer


def score(model, tokenizer, columns: dict, task, max_length: int, batch_size: int) -> dict[str, float]:
    import datasets

    from dskd import data, models
    from dskd.training.evaluation import evaluate

    dataset = data.tokenize_split(datasets.Dataset.from_dict(columns), tokenizer, max_length, in_memory=True)
    return evaluate(lambda b: getattr(model(**models.model_inputs(b, model)), task.prediction), dataset, task,
                    tokenizer, batch_size, "cpu")


def run_robustness(cfg, model_paths: list[str], root: Path, output: Path, wanted=None, extra=None, label_maps=None,
                   max_examples: int | None = None, seed: int = 0, max_length: int | None = None,
                   batch_size: int = 64) -> dict:
    """Score every model on every set; write and return the table."""
    import torch

    from dskd import data
    from dskd.config import resolve_path
    from dskd.data.robustness import read_eval_set, subsample

    if max_examples is not None and max_examples < 1:
        raise DskdError(f"--max-examples must be at least 1, got {max_examples}")
    task = data.get_task(cfg.data.task)
    if cfg.data.path is None:
        raise DskdError("dskd robustness reads the dev split from a GLUE folder, and data.path is null (the hub); "
                        "--set data.path=../shared/data/glue")
    dev_file = Path(resolve_path(cfg.data.path)) / task.folder / task.dev_file
    sets = build_sets(task, dev_file, Path(resolve_path(str(root))), wanted, extra or {}, label_maps or {})
    columns = {s.name: subsample(read_eval_set(s, task), max_examples, seed) for s in sets}
    length = max_length or cfg.data.max_length
    rows = []
    for path in model_paths:
        name, model, tokenizer = load_model(path, task)
        with torch.no_grad():
            results = {s.name: dict(score(model, tokenizer, columns[s.name], task, length, batch_size),
                                    examples=len(columns[s.name]["label"])) for s in sets}
        rows.append({"model": name, "path": str(path), "sets": results})
    table = {"task": task.name, "main_metric": task.main_metric, "max_length": length, "seed": seed,
             "max_examples": max_examples,
             "sets": [{"name": s.name, "kind": s.kind, "file": str(s.file), "examples": len(columns[s.name]["label"])}
                      for s in sets],
             "models": rows}
    output.mkdir(parents=True, exist_ok=True)
    (output / "robustness.json").write_text(json.dumps(table, indent=2) + "\n")
    (output / "robustness.md").write_text(format_table(table))
    return table


def format_table(table: dict) -> str:
    """Markdown: one row per model, the main metric (×100) per set, and each set's drop from dev."""
    metric = table["main_metric"]
    sets = table["sets"]
    head = "| model | " + " | ".join(f"{s['name']} ({s['kind']}, n={s['examples']})" for s in sets) + " |"
    lines = [f"{table['task']}: {metric} × 100; in brackets, the change from dev", "", head,
             "|---|" + "---|" * len(sets)]
    for row in table["models"]:
        dev = row["sets"].get("dev", {}).get(metric)
        cells = []
        for s in sets:
            value = row["sets"][s["name"]][metric]
            drop = f" ({100 * (value - dev):+.1f})" if dev is not None and s["name"] != "dev" else ""
            cells.append(f"{100 * value:.1f}{drop}")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
