"""Reading a GLUE split: a local TSV folder (``data.path``) or the Hugging Face hub.

Both routes produce the same columns: ``text_a``, ``text_b`` (pair tasks only), ``label``
and ``idx`` (the row's 0-based position in its split, kept so predictions can be matched
back to examples).
"""

from __future__ import annotations

import math
from pathlib import Path

import datasets

from dskd.config import resolve_path
from dskd.data.tasks import GLUE_TASKS, TaskSpec
from dskd.errors import DskdError


def _expected_layout(task: TaskSpec) -> str:
    return (
        f"expected the GLUE layout <data.path>/{task.folder}/{task.train_file} and "
        f"<data.path>/{task.folder}/{task.dev_file}"
    )


def _read_lines(path: Path) -> list[str]:
    """The file's lines without their line endings, trailing empty lines dropped.

    Splits on "\\n" only, so a stray "\\r" inside a sentence stays part of the text.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DskdError(f"cannot read {path}: {exc.strerror}; check the file's permissions.") from None
    lines = []
    for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(raw_line.removesuffix(b"\r").decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DskdError(
                f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                "re-save the file as UTF-8."
            ) from None
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _parse_label(task: TaskSpec, value: str, where: str) -> int | float:
    value = value.strip()
    if task.label_names is None:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DskdError(
                f"{where}: label {value!r} in column {task.label_column!r} is not a number; "
                f"{task.folder} labels are real-valued scores. Fix or remove this line."
            )
        return score
    try:
        return task.label_names.index(value)
    except ValueError:
        allowed = ", ".join(repr(label) for label in task.label_names)
        raise DskdError(
            f"{where}: label {value!r} in column {task.label_column!r} is not a {task.folder} "
            f"label (allowed: {allowed}). Fix or remove this line."
        ) from None


def read_glue_tsv(path: Path, task: TaskSpec, limit: int | None = None) -> dict[str, list]:
    """Read one GLUE split file into columns text_a, text_b (pair tasks), label, idx.

    GLUE files are tab-separated without quoting, so quote characters are kept as text.
    ``limit`` keeps the first ``limit`` data rows: a deterministic subsample (the file's
    prefix), which is what makes quick runs reproducible.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit!r}")
    path = Path(path)
    if not path.is_file():
        raise DskdError(
            f"{path} does not exist or is not a file; {_expected_layout(task)} "
            "(set data.path accordingly)."
        )
    lines = _read_lines(path)
    no_data_rows = f"`{path}` has no data rows; add examples or point data.path at a complete GLUE copy."
    if not lines:
        raise DskdError(no_data_rows)

    if task.headerless_columns is not None:
        header = list(task.headerless_columns)
        first_data_line = 0
    else:
        header = lines[0].removeprefix("\ufeff").split("\t")
        first_data_line = 1

    def column_index(column: str) -> int:
        try:
            return header.index(column)
        except ValueError:
            raise DskdError(
                f"{path}:1: header has no column {column!r} (found: {', '.join(header)}); "
                f"a GLUE {task.folder} file needs columns "
                f"{', '.join((*task.text_columns, task.label_column))}. "
                f"Check that data.task matches this file."
            ) from None

    text_indices = [column_index(column) for column in task.text_columns]
    label_index = column_index(task.label_column)

    data_lines = lines[first_data_line:]
    if limit is not None:
        data_lines = data_lines[:limit]
    if not data_lines:
        raise DskdError(no_data_rows)

    texts: list[list[str]] = [[] for _ in text_indices]
    labels: list[int | float] = []
    for row, line in enumerate(data_lines):
        lineno = first_data_line + row + 1
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DskdError(
                f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                f"(header: {' | '.join(header)}), found {len(fields)}. GLUE files are "
                "tab-separated without quoting; fix or remove this line."
            )
        for column_texts, index in zip(texts, text_indices):
            column_texts.append(fields[index])
        labels.append(_parse_label(task, fields[label_index], f"{path}:{lineno}"))

    columns: dict[str, list] = {"text_a": texts[0]}
    if task.is_pair:
        columns["text_b"] = texts[1]
    columns["label"] = labels
    columns["idx"] = list(range(len(labels)))
    return columns


def _features(task: TaskSpec) -> datasets.Features:
    features = {"text_a": datasets.Value("string")}
    if task.is_pair:
        features["text_b"] = datasets.Value("string")
    features["label"] = datasets.Value("float32" if task.is_regression else "int64")
    features["idx"] = datasets.Value("int64")
    return datasets.Features(features)


def _task_folder(task: TaskSpec, path: str) -> Path:
    """Accept either the GLUE root (holding ``<folder>/``) or the task folder itself."""
    root = Path(path)
    if (root / task.folder).is_dir():
        return root / task.folder
    if (root / task.train_file).is_file() or (root / task.dev_file).is_file():
        return root
    if not root.exists():
        problem = "does not exist"
    else:
        problem = f"contains neither {task.folder}/ nor {task.train_file}/{task.dev_file}"
    raise DskdError(
        f"data.path: {root} {problem}; set data.path to the GLUE root folder (holding "
        f"{task.folder}/) or to the {task.folder} folder itself."
    )


def _load_from_hub(task: TaskSpec, split: str) -> datasets.Dataset:
    if split == "train":
        hub_split = "train"
    else:
        hub_split = "validation_matched" if task.name == "mnli" else "validation"
    try:
        ds = datasets.load_dataset(*task.hub_name, split=hub_split)
    # Offline machines and hub outages surface as many exception types (requests,
    # huggingface_hub, OSError, datasets' own); each means "use local files instead".
    except Exception as exc:
        raise DskdError(
            f"could not load GLUE task {task.name} from the hub ({type(exc).__name__}: {exc}); "
            f"set data.path to a local GLUE folder ({_expected_layout(task)})."
        ) from exc
    renames = dict(zip(task.hub_text_columns, ("text_a", "text_b")))
    ds = ds.select_columns([*task.hub_text_columns, "label", "idx"]).rename_columns(renames)
    # The hub stores labels as ClassLabel and idx as int32; match the local-file route.
    return ds.cast(_features(task))


def load_split(
    task: TaskSpec, path: str | None, split: str, limit: int | None = None
) -> datasets.Dataset:
    """Load the "train" or "dev" split, from ``path`` if given, else from the hub.

    ``limit`` keeps the split's first ``limit`` rows (see :func:`read_glue_tsv`).
    """
    file_name = task.split_file(split)
    if path is None:
        ds = _load_from_hub(task, split)
        return ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    file = _task_folder(task, resolve_path(path)) / file_name
    # Parse once up front so a malformed file fails here with its path and line,
    # not wrapped inside a datasets generation error.
    read_glue_tsv(file, task, limit)
    stat = file.stat()
    # A file-backed dataset (not from_dict): datasets then caches it and the
    # tokenised version on disk. The file's size and mtime are part of the
    # fingerprint, so an edited file is read again.
    return datasets.Dataset.from_generator(
        _rows,
        features=_features(task),
        gen_kwargs={
            "file": str(file.resolve()),
            "task_name": task.name,
            "limit": limit,
            "stamp": (stat.st_size, stat.st_mtime_ns),
        },
    )


def _rows(file: str, task_name: str, limit: int | None, stamp: tuple[int, int]):
    del stamp  # only part of the cache fingerprint
    columns = read_glue_tsv(Path(file), GLUE_TASKS[task_name], limit)
    names = list(columns)
    for values in zip(*(columns[name] for name in names)):
        yield dict(zip(names, values))


