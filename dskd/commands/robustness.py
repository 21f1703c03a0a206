"""``dskd robustness``: models against the task's dev set, out-of-domain text and adversarial
sets, in one table (the Combined-KD paper's framework: in-domain, out-of-domain, adversarial).

Every model (a dskd run folder, an exported folder, a teacher) is scored with its own tokenizer
on every set. Sets: ``dev`` (the config's ``data.path`` dev split), the sets shipped for the
task (``dskd.data.robustness``), and any ``--eval-file NAME=PATH`` with an optional label map.
The table is written as ``robustness.md`` and ``robustness.json`` in ``--output``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dskd.errors import DskdError

MLM = ("a folder with a masked-LM model (e.g. bert-base with its MLM head), or leave --mlm out to use each "
       "model's own embedding neighbours")


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
    vocab = model.config.vocab_size  # (a factored embedding, as KroneckerBERT's, has no weight matrix)
    if len(tokenizer) > vocab:
        raise DskdError(f"--models {path}: its tokenizer has {len(tokenizer)} tokens but the model's embedding table "
                        f"{vocab} rows: they are not one model's; give a folder holding both (a run's model/)")
    return Path(path).name or path, model, tokenizer


def score(model, tokenizer, columns: dict, task, max_length: int, batch_size: int,
          device="cpu") -> tuple[dict[str, float], list]:
    """The task's metrics on a set, and the predicted label of every example (in order)."""
    import datasets

    from dskd import data, models
    from dskd.training.evaluation import predict

    dataset = data.tokenize_split(datasets.Dataset.from_dict(columns), tokenizer, max_length, in_memory=True)
    outputs, labels = predict(lambda b: getattr(model(**models.model_inputs(b, model)), task.prediction), dataset,
                              task, tokenizer, batch_size, device)
    predicted = outputs.reshape(-1) if task.is_regression else outputs.argmax(-1)
    return task.score(outputs, labels), predicted.tolist()


def predictor(model, tokenizer, max_length: int, batch_size: int, device="cpu"):
    """texts -> class probabilities, batched: what the attacks query (``attacks.Predictor``)."""
    import numpy as np
    import torch

    from dskd import models

    def predict(examples: list[tuple[str, ...]]) -> np.ndarray:
        out = []
        for start in range(0, len(examples), batch_size):
            columns = list(zip(*examples[start:start + batch_size], strict=True))
            encoded = tokenizer(*columns, truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt").to(device)
            with torch.no_grad():
                logits = model(**models.model_inputs(encoded, model)).logits.float()
                out.append(torch.softmax(logits, -1).cpu().numpy())
        return np.concatenate(out)

    return predict


def check_attack_budget(attack_examples: int, max_queries: int, max_words: float) -> None:
    if attack_examples < 1:
        raise DskdError(f"--attack-examples must be at least 1 (dev examples attacked per model), got {attack_examples}")
    if max_queries < 1:
        raise DskdError(f"--max-queries must be at least 1 (model calls per attacked example), got {max_queries}")
    if not 0 < max_words <= 1:
        raise DskdError(f"--max-words must be a share of the words in (0, 1], got {max_words}")


def attack_model(name: str, model, tokenizer, columns: dict, kinds: list[str], output: Path, *, max_length: int,
                 batch_size: int, max_queries: int, max_words: float, seed: int, mlm=None,
                 device="cpu") -> tuple[dict, dict]:
    """Each attack of ``kinds`` on every example of ``columns`` (the attacked dev subsample); the
    adversarial examples go to ``<output>/attacks/<name>-<kind>.jsonl``. Returns the summaries and,
    per attack, the prediction on every example after it (the clean one where it was not attacked)."""
    from dataclasses import asdict

    from tqdm import tqdm

    from dskd.commands import attacks

    from dskd.runtime import dist

    predict = predictor(model, tokenizer, max_length, batch_size, device)
    texts = list(zip(*(columns[c] for c in ("text_a", "text_b") if c in columns), strict=True))
    # On several ranks each attacks every world-th example; rank 0 gathers them in order.
    rank, world = dist.rank(), dist.world_size()
    mine = list(range(rank, len(texts), world))
    summaries, after = {}, {}
    for kind in kinds:
        if kind == "word":
            candidates = attacks.mlm_candidates(*mlm) if mlm is not None else \
                attacks.embedding_neighbours(model, tokenizer)

            def run(t, y, c=candidates):
                return attacks.word_attack(predict, t, y, candidates=c, max_words=max_words, max_queries=max_queries,
                                           seed=seed)
        else:
            def run(t, y):
                return attacks.char_attack(predict, t, y, max_words=max_words, max_queries=max_queries, seed=seed)
        local = [run(texts[i], columns["label"][i])
                 for i in tqdm(mine, desc=f"{kind} attack on {name}", leave=False, disable=rank != 0)]
        results = _gather_in_order(local, mine, len(texts), world)
        if rank == 0:
            folder = output / "attacks"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}-{kind}.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in results))
        summaries[kind] = attacks.summarize(results)
        after[kind] = [r.adv_pred for r in results]
    return summaries, after


def _gather_in_order(local: list, indices: list[int], total: int, world: int) -> list:
    """Every rank's results, back in example order (one all_gather_object on several ranks)."""
    if world == 1:
        return local
    import torch

    parts = [None] * world
    torch.distributed.all_gather_object(parts, list(zip(indices, local, strict=True)))
    ordered = dict(pair for part in parts for pair in part)
    return [ordered[i] for i in range(total)]


def load_mlm(path: str):
    """(masked LM, tokenizer) for the word attack's substitutes, or one line naming what is missing."""
    from dskd import models
    from dskd.config import TeacherConfig

    try:
        from transformers import AutoModelForMaskedLM

        source, hub = models.model_source(path, "--mlm", MLM)
        model = AutoModelForMaskedLM.from_pretrained(source, **hub).eval()
    except (OSError, ValueError) as exc:
        raise DskdError(f"--mlm {path}: not a masked-LM model ({str(exc).splitlines()[0]}); the word attack needs one "
                        "with its MLM head, or leave --mlm out to use each model's own embedding neighbours") from None
    return model, models.load_tokenizer(TeacherConfig(path=path), key="--mlm")


def run_robustness(cfg, model_paths: list[str], root: Path, output: Path, wanted=None, extra=None, label_maps=None,
                   max_examples: int | None = None, seed: int = 0, max_length: int | None = None,
                   batch_size: int = 64, attack_kinds: list[str] | None = None, attack_examples: int = 100,
                   max_queries: int = 500, max_words: float = 0.2, mlm: str | None = None,
                   compare_to: str | None = None, device="cpu") -> dict:
    """Score every model on every set, and attack it (``attack_kinds``: word, char) on a seeded
    sample of ``attack_examples`` dev examples, on ``device``; write and return the table. ``compare_to`` (one of
    the models, by path or name): every other model's difference from it, per set and attack, with
    a paired bootstrap over the examples (:func:`compare_rows`)."""
    import torch

    from dskd import data
    from dskd.config import resolve_path
    from dskd.data.robustness import EvalSet, read_eval_set, subsample
    from dskd.runtime import dist

    if max_examples is not None and max_examples < 1:
        raise DskdError(f"--max-examples must be at least 1, got {max_examples}")
    names = [str(p) for p in model_paths] + [Path(p).name for p in model_paths]
    if compare_to is not None and compare_to not in names:
        raise DskdError(f"--compare-to {compare_to} is not one of --models; give one of them (its path or folder "
                        "name), e.g. the soft-label KD student")
    if attack_kinds:
        check_attack_budget(attack_examples, max_queries, max_words)
    mlm_model = load_mlm(mlm) if mlm and "word" in (attack_kinds or ()) else None
    task = data.get_task(cfg.data.task)
    if compare_to is not None:
        from dskd.data.significance import check_metric

        try:
            check_metric(task.main_metric, task.num_labels)
        except ValueError as exc:
            raise DskdError(f"--compare-to on {task.name}: {exc}") from None
    if cfg.data.path is None:
        raise DskdError("dskd robustness reads the dev split from a GLUE folder, and data.path is null (the hub); "
                        "--set data.path=../shared/data/glue")
    dev_file = Path(resolve_path(cfg.data.path)) / task.folder / task.dev_file
    sets = build_sets(task, dev_file, Path(resolve_path(str(root))), wanted, extra or {}, label_maps or {})
    columns = {s.name: subsample(read_eval_set(s, task), max_examples, seed) for s in sets}
    length = max_length or cfg.data.max_length
    settings = {"format": 2, "task": task.name, "main_metric": task.main_metric, "max_length": length, "seed": seed,
                "max_examples": max_examples,
                "attacks": {"kinds": attack_kinds, "examples": attack_examples, "max_queries": max_queries,
                            "max_words": max_words, "substitutes": mlm or "embedding neighbours"} if attack_kinds else None,
                "sets": [{"name": s.name, "kind": s.kind, "file": str(s.file), "examples": len(columns[s.name]["label"])}
                         for s in sets]}
    if attack_kinds:
        dev = columns["dev"] if "dev" in columns else read_eval_set(EvalSet("dev", "in-domain", dev_file), task)
        attacked = subsample(dev, attack_examples, seed)
    # The models an interrupted run (robustness.partial.json) or a finished table (robustness.json)
    # of the same settings scored are kept: a resumed or extended table scores only the others.
    partial = output / "robustness.partial.json"
    done = {}
    for file in (output / "robustness.json", partial):
        if file.is_file():
            earlier = json.loads(file.read_text())
            if earlier.get("settings", {key: earlier.get(key) for key in settings}) == settings:
                done.update({row["path"]: (file.name, {k: v for k, v in row.items() if k != "compare"})
                             for row in earlier["models"]})
    rows = []
    for path in model_paths:
        if str(path) in done:
            source, row = done[str(path)]
            rows.append(row)
            if dist.rank() == 0:
                print(f"[robustness] {path}: kept from {output / source} (same settings)", file=sys.stderr, flush=True)
            continue
        name, model, tokenizer = load_model(path, task)
        model.to(device)
        row = {"model": name, "path": str(path), "sets": {}, "predicted": {}}
        with torch.no_grad():
            for s in sets:
                metrics, row["predicted"][s.name] = score(model, tokenizer, columns[s.name], task, length, batch_size,
                                                          device)
                row["sets"][s.name] = dict(metrics, examples=len(columns[s.name]["label"]))
        if attack_kinds:
            row["attacks"], row["attacked_predicted"] = attack_model(
                name, model, tokenizer, attacked, attack_kinds, output, max_length=length, batch_size=batch_size,
                max_queries=max_queries, max_words=max_words, seed=seed, mlm=mlm_model, device=device)
        rows.append(row)
        if dist.rank() == 0:
            to_tensorboard(Path(path), row)
            output.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"settings": settings, "models": rows}) + "\n")
    labels = {s.name: columns[s.name]["label"] for s in sets}
    if attack_kinds:
        labels["attacked"] = attacked["label"]
    table = dict(settings, models=rows, labels=labels)
    if compare_to is not None:
        compare_rows(table, compare_to, task)
    if dist.rank() != 0:
        return table
    output.mkdir(parents=True, exist_ok=True)
    (output / "robustness.json").write_text(json.dumps(table, indent=2) + "\n")
    (output / "robustness.md").write_text(format_table(table))
    partial.unlink(missing_ok=True)
    return table


def compare_rows(table: dict, reference: str, task) -> None:
    """Each model's difference from the ``reference`` model on every set (the task's main metric) and
    under every attack (accuracy after it), with the 95% interval and p of a paired bootstrap over
    the examples (``dskd.data.significance``): ``row["compare"]``. One run per model: seed variance
    is not in it."""
    from dskd.data.significance import paired_bootstrap

    ref = next(r for r in table["models"] if reference in (r["path"], r["model"]))
    table["compare_to"] = ref["model"]
    for row in table["models"]:
        if row is ref:
            continue
        row["compare"] = {name: paired_bootstrap(table["main_metric"], [row["predicted"][name]],
                                                 [ref["predicted"][name]], labels, num_labels=task.num_labels)
                          for name, labels in table["labels"].items() if name in row["predicted"]}
        for kind, predicted in row.get("attacked_predicted", {}).items():
            row["compare"][f"{kind} attack"] = paired_bootstrap("accuracy", [predicted], [ref["attacked_predicted"][kind]],
                                                                table["labels"]["attacked"], num_labels=task.num_labels)


def to_tensorboard(run: Path, row: dict) -> None:
    """A dskd run folder's results also go to its TensorBoard, at the run's last step:
    ``robustness/<set>/<metric>`` and ``robustness/<attack>_attack/<rate>``."""
    if not (run / "run.json").is_file() or not (run / "tensorboard").is_dir():
        return
    from torch.utils.tensorboard import SummaryWriter

    metrics = run / "metrics.json"
    step = json.loads(metrics.read_text()).get("step", 0) if metrics.is_file() else 0
    writer = SummaryWriter(log_dir=str(run / "tensorboard"), filename_suffix=".robustness")
    for name, values in row["sets"].items():
        for key, value in values.items():
            writer.add_scalar(f"robustness/{name}/{key}", value, step)
    for kind, summary in row.get("attacks", {}).items():
        for key, value in summary.items():
            writer.add_scalar(f"robustness/{kind}_attack/{key}", value, step)
    writer.close()


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
    if table.get("attacks"):
        a = table["attacks"]
        lines += ["", f"Attacks on each model ({a['examples']} dev examples drawn with seed {table['seed']}; at most "
                      f"{a['max_queries']} queries and {100 * a['max_words']:.0f}% of the words per example; word "
                      f"substitutes: {a['substitutes']}): clean accuracy, accuracy under attack, attack success rate, "
                      "mean share of words changed (successful attacks), mean queries per attacked example", "",
                  "| model | attack | clean | under attack | success rate | words changed | queries |",
                  "|---|---|---|---|---|---|---|"]
        for row in table["models"]:
            for kind, r in row.get("attacks", {}).items():
                lines.append(f"| {row['model']} | {kind} | {100 * r['clean_accuracy']:.1f} | "
                             f"{100 * r['adversarial_accuracy']:.1f} | {100 * r['attack_success_rate']:.1f} | "
                             f"{100 * r['mean_words_changed']:.1f}% | {r['mean_queries']:.1f} |")
    compared = [row for row in table["models"] if "compare" in row]
    if compared:
        columns = list(compared[0]["compare"])
        lines += ["", f"Difference from {table['compare_to']} (points; sets: {metric}, attacks: accuracy under attack), "
                      "95% interval and p of a paired bootstrap over the examples; * p < 0.05", "",
                  "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for row in compared:
            cells = [f"{100 * c['diff']:+.1f}{'*' if c['p'] < 0.05 else ''} [{100 * c['low']:+.1f}, "
                     f"{100 * c['high']:+.1f}] p={c['p']:.2g}" for c in (row["compare"][k] for k in columns)]
            lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
