"""Evaluation sets beyond a task's dev split: out-of-domain text and static adversarial sets.

Each set is a GLUE-format TSV with the task's text columns and a label column. Its labels are
the task's (AdvGLUE's files use GLUE's own label names and order) or are mapped onto them with
a label map (``{"pos": "positive"}``; values may be the task's class names or ids). Shipped for
the tasks that have them, under ``../shared/data/robustness``:

* ``imdb`` (SST-2, out-of-domain): the 25,000 IMDb test reviews (Maas et al. 2011), 0 =
  negative, 1 = positive as in SST-2. Reviews keep the corpus's HTML line breaks
  (``<br /><br />``), which are replaced by a space here (SST-2 sentences have none). A review
  averages about 230 words, far above the length students are trained at: the tokenizer keeps
  the first ``max_length`` tokens (head truncation, the usual choice for IMDb with BERT).
  The file lists all negative reviews, then all positive ones, so a subsample is drawn at
  random (seeded), never as a prefix.
* ``advglue`` (SST-2, RTE; adversarial, static): AdvGLUE's dev set (Wang et al. 2021),
  perturbations found by attacking other models, i.e. transfer attacks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dskd.data.glue import _parse_label, _read_lines
from dskd.data.tasks import TaskSpec
from dskd.errors import DskdError

HTML_BREAK = re.compile(r"\s*<br\s*/?>\s*", re.IGNORECASE)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: ``kind`` is ``in-domain``, ``out-of-domain`` or ``adversarial``."""

    name: str
    kind: str
    file: Path
    label_map: dict[str, str] = field(default_factory=dict)
    clean_html: bool = False


# Built-in sets per task, relative to the robustness data folder.
SHIPPED = {
    "sst2": (("imdb", "out-of-domain", "imdb/test.tsv", True),
             ("advglue", "adversarial", "advglue/glue_tsv/SST-2/dev.tsv", False)),
    "rte": (("advglue", "adversarial", "advglue/glue_tsv/RTE/dev.tsv", False),),
}


def shipped_sets(task: TaskSpec, root: Path) -> list[EvalSet]:
    """The shipped out-of-domain and adversarial sets of ``task`` under ``root``."""
    return [EvalSet(name, kind, Path(root) / rel, clean_html=html)
            for name, kind, rel, html in SHIPPED.get(task.name, ())]


def parse_label_map(text: str) -> dict[str, str]:
    """``"pos=positive,neg=negative"`` -> {"pos": "positive", "neg": "negative"}."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise DskdError(f"label map entry {part!r} is not FILE_LABEL=TASK_LABEL (e.g. pos=positive,neg=negative)")
        source, target = (s.strip() for s in part.split("=", 1))
        pairs[source] = target
    return pairs


def read_eval_set(spec: EvalSet, task: TaskSpec) -> dict[str, list]:
    """The set's columns (text_a, text_b for pair tasks, label, idx) with labels as the task's ids."""
    path = spec.file
    if not path.is_file():
        raise DskdError(f"evaluation set {spec.name!r}: {path} does not exist or is not a file; give a GLUE-format TSV "
                        f"with the columns {', '.join((*task.text_columns, task.label_column))}")
    lines = _read_lines(path)
    if len(lines) < 2:
        raise DskdError(f"evaluation set {spec.name!r}: {path} has no data rows")
    header = lines[0].removeprefix("\ufeff").split("\t")
    wanted = (*task.text_columns, task.label_column)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DskdError(f"evaluation set {spec.name!r}: {path}:1 has no column(s) {', '.join(missing)} (found: "
                        f"{', '.join(header)}); a {task.folder} set needs {', '.join(wanted)}")
    index = [header.index(c) for c in wanted]
    targets = {k: _map_target(v, task, spec, path) for k, v in spec.label_map.items()}
    columns: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DskdError(f"{path}:{lineno}: expected {len(header)} tab-separated fields, found {len(fields)}")
        texts = [fields[i] for i in index[:-1]]
        if spec.clean_html:
            texts = [HTML_BREAK.sub(" ", t).strip() for t in texts]
        columns["text_a"].append(texts[0])
        if task.is_pair:
            columns["text_b"].append(texts[1])
        raw = fields[index[-1]].strip()
        if spec.label_map:
            if raw not in targets:
                raise DskdError(
                    f"{path}:{lineno}: label {raw!r} of evaluation set {spec.name!r} is not in its label map "
                    f"({', '.join(sorted(targets))}); map every label of the file onto {task.folder}'s "
                    f"({', '.join(task.label_names or ())}), e.g. --label-map {spec.name}:{raw}=..."
                )
            columns["label"].append(targets[raw])
        else:
            columns["label"].append(_label(task, raw, spec, f"{path}:{lineno}"))
    if not task.is_pair:
        del columns["text_b"]
    columns["idx"] = list(range(len(columns["label"])))
    return columns


def _label(task: TaskSpec, raw: str, spec: EvalSet, where: str):
    """The task's own label parsing, plus class names and ids given as digits."""
    try:
        return _parse_label(task, raw, where)
    except DskdError:
        if task.label_names is not None and raw.isdigit() and int(raw) < len(task.label_names):
            return int(raw)
        if task.label_names is not None and raw in (task.class_names or ()):
            return task.class_names.index(raw)
        raise DskdError(f"{where}: label {raw!r} of evaluation set {spec.name!r} is not a {task.folder} label "
                        f"({', '.join(task.label_names)}); give a label map: --label-map {spec.name}:{raw}=...") from None


def _map_target(value: str, task: TaskSpec, spec: EvalSet, path: Path) -> int:
    names = list(task.label_names or ())
    classes = list(task.class_names or ())
    if value in names:
        return names.index(value)
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(names):
        return int(value)
    raise DskdError(f"evaluation set {spec.name!r} ({path}): label map target {value!r} is not a {task.folder} label "
                    f"(one of {', '.join(names + classes)})")


def subsample(columns: dict[str, list], limit: int | None, seed: int) -> dict[str, list]:
    """At most ``limit`` examples, drawn at random with ``seed`` (kept in file order)."""
    n = len(columns["label"])
    if limit is None or limit >= n:
        return columns
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:limit])
    return {k: [v[i] for i in keep] if k != "idx" else list(range(limit)) for k, v in columns.items()}
