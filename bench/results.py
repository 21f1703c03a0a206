"""Run the grid behind docs/results.md and print its table.

The grid itself (teacher, students, recipes, run folders, launches) is ``bench/results_grid.py``;
this script runs what is missing of it, then collects the finished runs into tables.

    python bench/results.py --root runs/results --seeds 1 2 3        # run what is missing, print the table
    python bench/results.py --root runs/results --table-only --json  # only collect

A method may carry a teacher variant: ``soft_kd@full`` distils from a teacher fine-tuned on every
training row (SST-2: 67,349 sentences, not the students' 8,000), ``soft_kd@full+unlabeled`` also
trains on the rows after the students' 8,000 without their labels (``data.unlabeled``), taught
through a teacher cache, and ``no_teacher@all`` trains on every row with its label (one epoch, as
many steps as ``@full+unlabeled``: what the labels alone give). ``--set KEY=VALUE`` applies to
every student (e.g. training.group_by_length=true).

Every finished run keeps its dev predictions (``dev_predictions.jsonl``; older runs get them
from ``dskd evaluate --predictions``) and the wall time of each launch (``wall.json``). The
table gives mean ± standard deviation over seeds and, per cell, the difference to a reference
row (a method: soft-label KD; soft-label KD: no teacher; a variant: the row without it) with the
95% interval and p of a paired bootstrap over dev examples and seeds (dskd/data/significance.py);
``*`` marks p < 0.05, ``†`` an adjusted p < 0.05 once the column's tests are counted as one family
(Holm's step-down adjustment over a task's comparisons; likewise for each task's pairs). A second
table gives each row's share of its own teacher and the median
wall minutes of a run. ``--compare-root ROOT`` adds each row against the same row of another grid
(e.g. one without length-grouped batches) and the mean of those differences over rows, with the
same bootstrap (the examples drawn once for every row). ``--pairs ROW:OTHER ...`` tests further
pairs of rows against each other in the same way (e.g. ``internal_pid:internal_all``, a paper's
claim that is not a row's own reference). Markdown goes to stdout; ``--json`` prints the numbers
instead. ``--keep DIR`` copies each finished run's record to DIR (results/ in the repository) so
that the tables can be made from the records alone; ``--docs FILE.md`` rewrites the tables a
document marks with the arguments that make them (a test checks docs/results.md's). For such
tables: ``--rows ROW ...`` keeps those rows and the rows they are compared with, ``--metric NAME``
reports and tests another metric than the task's own (MRPC accuracy beside its F1), ``--no-cost``
leaves out the second table.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from results_grid import (  # noqa: E402
    DEFAULT_METHODS, GENERAL_ROWS, METHODS, PREDICTIONS, TASKS, VARIANTS, WALL, completed, method_arg, reference,
    run_grid, split_method, student_dir, table_rows, teacher_dir)

from dskd.data import get_task  # noqa: E402
from dskd.data.significance import holm, paired_bootstrap, pooled_paired_bootstrap  # noqa: E402

POOLED = "mean over rows"  # compare_roots' key for the pooled test
METRIC_CHOICES = ("accuracy", "f1", "matthews_corrcoef")  # what the paired bootstrap computes
ALPHA = 0.05


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
        entry = {"metric": getattr(args, "metric", None) or spec.main_metric,
                 "teacher": json.loads((teacher / "metrics.json").read_text()), "rows": {}}
        if entry["metric"] not in entry["teacher"]:
            reported = sorted(k for k in entry["teacher"] if k in METRIC_CHOICES)
            raise SystemExit(f"--metric {entry['metric']}: {task}'s runs report {', '.join(reported)}; "
                             f"choose one of those (or leave --metric out for the task's own metric)")
        if completed(teacher_dir(root, task, "full")):
            entry["teacher_full"] = json.loads((teacher_dir(root, task, "full") / "metrics.json").read_text())
        for layers in args.layers:
            for name in shown_rows(args):
                runs = [r for r in (student_dir(root, task, layers, name, s) for s in args.seeds) if completed(r)]
                if runs:
                    entry["rows"][f"L{layers}/{name}"] = [_run_record(r) for r in runs]
        table[task] = entry
    return table


def shown_rows(args) -> list[str]:
    """The rows the tables hold: ``--rows`` and, so that each is tested, the chain of rows it is
    compared with (soft_kd@full+unlabeled: soft_kd@full, soft_kd, no_teacher), and the rows of
    ``--pairs`` so that no pair is silently left out; default every row."""
    if not getattr(args, "rows", None):
        return table_rows()
    wanted = list(args.rows) + [row for pair in getattr(args, "pairs", None) or [] for row in pair]
    keep = set()
    for row in wanted:
        while row is not None and row not in keep:
            keep.add(row)
            row = reference(row)
    return [r for r in table_rows() if r in keep]


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
                    stats = compare(entry["rows"][row], entry["rows"][f"L{layers}/{ref}"], spec, entry["metric"])
                    if stats is not None:
                        entry.setdefault("compare", {})[row] = dict(stats, reference=f"L{layers}/{ref}")
        adjust_family(entry.get("compare", {}).values())
        for rows in entry["rows"].values():
            for record in rows:
                record.pop("predicted", None), record.pop("labels", None)
    return table


def _run_record(run: Path) -> dict:
    record = dict(json.loads((run / "metrics.json").read_text()), run=run.name)
    if (run / WALL).is_file():
        wall = json.loads((run / WALL).read_text())
        # paused_seconds: time the run's processes were stopped (kill -STOP) for another measurement
        record["wall_seconds"] = sum(wall["seconds"]) - wall.get("paused_seconds", 0)
    kept = _predictions(run)
    if kept is not None:
        record["predicted"], record["labels"] = kept
    return record


def compare(rows: list[dict], ref_rows: list[dict], spec, metric: str) -> dict | None:
    """Paired bootstrap of a row against its reference, when every run of both kept its predictions."""
    if not all("predicted" in r for r in rows + ref_rows):
        return None
    return paired_bootstrap(metric, [r["predicted"] for r in rows], [r["predicted"] for r in ref_rows],
                            rows[0]["labels"], num_labels=spec.num_labels)


def adjust_family(family) -> None:
    """Add ``p_holm`` to each comparison of one table column (a family: one task's tests), so the
    table can mark what stays significant when the column's tests are counted together."""
    family = list(family)
    for stats, adjusted in zip(family, holm([s["p"] for s in family])):
        stats["p_holm"] = adjusted


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def _delta(stats: dict | None) -> str:
    if stats is None:
        return "-"
    mark = ("*" if stats["p"] < ALPHA else "") + ("†" if stats.get("p_holm", 1.0) < ALPHA else "")
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
            if theirs and (stats := compare(runs, theirs, spec, entry["metric"])) is not None:
                out.setdefault(task, {})[row] = dict(stats, n=len(runs), n_other=len(theirs))
                pairs.append(([r["predicted"] for r in runs], [r["predicted"] for r in theirs]))
                labels = runs[0]["labels"]
        if len(pairs) > 1:
            # Across rows: does the other grid's setting move every method the same way?
            pooled = pooled_paired_bootstrap(entry["metric"], pairs, labels, num_labels=spec.num_labels)
            out[task][POOLED] = dict(pooled, n=len(pairs), n_other=len(pairs))
        adjust_family(stats for row, stats in out.get(task, {}).items() if row != POOLED)
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


def row_arg(text: str) -> str:
    if text not in table_rows():
        variants = " or @".join(v for v in VARIANTS if v)
        raise argparse.ArgumentTypeError(f"{text!r}: a row is a method ({', '.join(METHODS)}; optionally "
                                         f"@{variants}) or a two-stage row ({', '.join(GENERAL_ROWS)})")
    return text


def pair_arg(text: str) -> tuple[str, str]:
    row, sep, other = text.partition(":")
    rows = table_rows()
    if not sep or row not in rows or other not in rows or row == other:
        variants = " or @".join(v for v in VARIANTS if v)
        raise argparse.ArgumentTypeError(f"{text!r}: a pair is ROW:OTHER, two different rows of the table: methods "
                                         f"({', '.join(METHODS)}; each optionally @{variants}) or two-stage rows "
                                         f"({', '.join(GENERAL_ROWS)})")
    return row, other


def compare_pairs(args, here: dict, pairs: list[tuple[str, str]]) -> dict:
    """Per task: each pair ``(row, other)`` at each depth where both rows kept their predictions,
    with the paired bootstrap of row against other (``here``: ``collect_with_predictions``)."""
    out = {}
    for task, entry in here.items():
        spec = get_task(task)
        for layers in args.layers:
            for row, other in pairs:
                mine, theirs = entry["rows"].get(f"L{layers}/{row}"), entry["rows"].get(f"L{layers}/{other}")
                if mine and theirs and (stats := compare(mine, theirs, spec, entry["metric"])) is not None:
                    out.setdefault(task, []).append(dict(stats, row=f"L{layers}/{row}", other=f"L{layers}/{other}",
                                                         n=len(mine), n_other=len(theirs)))
        adjust_family(out.get(task, []))
    return out


def pairs_markdown(result: dict) -> str:
    if not result:
        return "No pair has completed runs with dev predictions on both sides (same --tasks, --layers and --seeds)."
    lines = ["| task | row | vs | n / n | Δ row - vs [95% CI] p |", "|---|---|---|---|---|"]
    for task, items in result.items():
        for stats in items:
            (layers, row), other = stats["row"].split("/", 1), stats["other"].split("/", 1)[1]
            lines.append(f"| {task} | {layers[1:]} layers, {_label(row)} | {_label(other)} | "
                         f"{stats['n']} / {stats['n_other']} | {_delta(stats)} |")
    return "\n".join(lines)


def markdown(table: dict, layers_list: list[int]) -> str:
    tasks = list(table)
    head = "| student | method | vs | " + " | ".join(f"{t} {table[t]['metric']} | Δ [95% CI] p" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (2 * len(tasks) + 3)]
    lines.append("| teacher (6 layers, fine-tuned MiniLM) | - | | "
                 + " | ".join(f"{100 * table[t]['teacher'][table[t]['metric']]:.1f} | " for t in tasks) + " |")
    if any("teacher_full" in table[t] and any(split_method(row.split("/", 1)[1])[1] for row in table[t]["rows"])
           for t in tasks):  # the stronger teacher's line only where one of its students is a row
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "results")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, type=method_arg,
                        help="methods (configs/results/<method>.yaml), each optionally @full, @full+unlabeled or @all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--set", dest="student_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every student run (repeatable)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy each finished run's record (metrics, run status, dev predictions, wall time; no "
                             "weights) to DIR/TASK/RUN and skip the runs kept there: a grid that outlives its "
                             "checkout (results/ in the repository). The table of DIR: --root DIR --table-only")
    parser.add_argument("--table-only", action="store_true", help="collect finished runs, run nothing")
    parser.add_argument("--json", action="store_true", help="print the collected numbers as JSON")
    parser.add_argument("--compare-root", type=Path, metavar="ROOT",
                        help="also compare each row with the same row's runs under ROOT (paired bootstrap)")
    parser.add_argument("--pairs", nargs="+", type=pair_arg, default=[], metavar="ROW:OTHER",
                        help="also compare these rows with each other (paired bootstrap), e.g. internal_pid:internal_all")
    parser.add_argument("--metric", choices=METRIC_CHOICES,
                        help="report and test this metric instead of each task's own (e.g. MRPC accuracy beside "
                             "its F1); every task in --tasks must report it")
    parser.add_argument("--cost", action=argparse.BooleanOptionalAction, default=True,
                        help="the second table: share of the teacher and minutes per run (--no-cost: leave it out)")
    parser.add_argument("--rows", nargs="+", type=row_arg, metavar="ROW",
                        help="tables: only these rows and the rows each is compared with (default: every row "
                             "with finished runs); e.g. the stronger-teacher table: soft_kd@full+unlabeled")
    parser.add_argument("--docs", type=Path, metavar="FILE.md",
                        help="rewrite every table FILE.md holds between '<!-- bench/results.py ARGS -->' and "
                             "'<!-- /bench/results.py -->' from ARGS (--table-only implied), run nothing else")
    return parser


def tables(args) -> dict:
    """The collected table of ``args`` (rows, comparisons, pairs), without predictions."""
    here = collect_with_predictions(args, args.root)
    other = compare_roots(args, here, args.compare_root) if args.compare_root is not None else None
    pairs = compare_pairs(args, here, args.pairs) if args.pairs else None
    table = collect(args, here)  # drops the predictions: compare_roots and compare_pairs first
    if other is not None:
        table["compare_root"] = {"root": str(args.compare_root), "rows": other}
    if pairs is not None:
        table["pairs"] = pairs
    return table


def tables_markdown(args, table: dict) -> str:
    tasks = {t: e for t, e in table.items() if t not in ("compare_root", "pairs")}
    text = markdown(tasks, args.layers)
    if getattr(args, "cost", True):
        text += "\n\n" + cost_markdown(tasks, args.layers)
    if args.compare_root is not None:
        text += "\n\n" + compare_roots_markdown(table["compare_root"]["rows"], args.compare_root)
    if args.pairs:
        text += "\n\n" + pairs_markdown(table["pairs"])
    return text


# A table in the docs, made by the arguments in its opening marker (paths relative to the repository).
DOCS_BLOCK = re.compile(r"<!-- bench/results.py (?P<args>[^\n]*?) -->\n(?P<body>.*?)<!-- /bench/results.py -->", re.S)


def docs_tables(path: Path) -> list[tuple[str, str, str]]:
    """(arguments, table in the file, table the kept records give now) of every marked table in ``path``."""
    found = []
    for block in DOCS_BLOCK.finditer(path.read_text()):
        args = build_parser().parse_args([*shlex.split(block["args"]), "--table-only"])
        args.root = (REPO / args.root).resolve()
        if args.compare_root is not None:
            args.compare_root = REPO / args.compare_root
        found.append((block["args"], block["body"], tables_markdown(args, tables(args)) + "\n"))
    return found


def rewrite_docs(path: Path) -> int:
    """Rewrite ``path``'s marked tables from their records; the number of tables that changed."""
    text, changed = path.read_text(), 0
    for args, old, new in docs_tables(path):
        changed += old != new
        text = text.replace(f"<!-- bench/results.py {args} -->\n{old}", f"<!-- bench/results.py {args} -->\n{new}", 1)
    path.write_text(text)
    return changed


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.docs is not None:
        if not args.docs.is_file():
            parser.error(f"--docs {args.docs}: no such file")
        print(f"{args.docs}: {rewrite_docs(args.docs)} table(s) rewritten from their records")
        return
    args.root = args.root.resolve()
    if args.compare_root is not None and not args.compare_root.is_dir():
        parser.error(f"--compare-root {args.compare_root}: no such folder")
    if not args.table_only:
        run_grid(args)
    table = tables(args)
    print(json.dumps(table, indent=1) if args.json else tables_markdown(args, table))


if __name__ == "__main__":
    main()
