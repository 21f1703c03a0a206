"""GLUE task definitions, TSV reading, tokenization and batch collation.

Data comes either from a local GLUE folder (``data.path``), read with
:func:`read_glue_tsv`, or from the Hugging Face hub when ``data.path`` is unset. Both
routes produce the same columns: ``text_a``, ``text_b`` (pair tasks only), ``label`` and
``idx`` (the row's 0-based position in its split, kept so predictions can be matched
back to examples).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from dskd.config import resolve_path
from dskd.errors import DskdError

SPLITS = ("train", "dev")


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task is stored on disk and scored."""

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    headerless_columns: tuple[str, ...] | None = None
    # The hub's GLUE copy renames some text columns (MRPC, MNLI); None means the
    # hub uses the same names as the TSV header.
    hub_text_columns: tuple[str, ...] | None = None
    # None means ("nyu-mll/glue", name): the hub configs use the canonical names.
    hub_name: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.hub_name is None:
            object.__setattr__(self, "hub_name", ("nyu-mll/glue", self.name))
        if self.hub_text_columns is None:
            object.__setattr__(self, "hub_text_columns", self.text_columns)

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def split_file(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.train_file if split == "train" else self.dev_file


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="cola",
            folder="CoLA",
            text_columns=("sentence",),
            label_column="label",
            label_names=_BINARY,
            metrics=("matthews_corrcoef",),
            main_metric="matthews_corrcoef",
            headerless_columns=("source", "label", "notation", "sentence"),
        ),
        TaskSpec(
            name="sst2",
            folder="SST-2",
            text_columns=("sentence",),
            label_column="label",
            label_names=_BINARY,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="mrpc",
            folder="MRPC",
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            label_names=_BINARY,
            metrics=("f1", "accuracy"),
            main_metric="f1",
            hub_text_columns=("sentence1", "sentence2"),
        ),
        TaskSpec(
            name="qqp",
            folder="QQP",
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            label_names=_BINARY,
            metrics=("f1", "accuracy"),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="stsb",
            folder="STS-B",
            text_columns=("sentence1", "sentence2"),
            label_column="score",
            label_names=None,
            metrics=("pearson", "spearman"),
            main_metric="pearson",
        ),
        TaskSpec(
            name="mnli",
            folder="MNLI",
            text_columns=("sentence1", "sentence2"),
            label_column="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            main_metric="accuracy",
            dev_file="dev_matched.tsv",
            hub_text_columns=("premise", "hypothesis"),
        ),
        TaskSpec(
            name="qnli",
            folder="QNLI",
            text_columns=("question", "sentence"),
            label_column="label",
            label_names=_ENTAILMENT,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="rte",
            folder="RTE",
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            label_names=_ENTAILMENT,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
        TaskSpec(
            name="wnli",
            folder="WNLI",
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            label_names=_BINARY,
            metrics=("accuracy",),
            main_metric="accuracy",
        ),
    )
}


def _normalize_task_name(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str) -> TaskSpec:
    """Look up a GLUE task by canonical or folder name ("sst2", "SST-2", "STS-B", ...)."""
    known = ", ".join(GLUE_TASKS)
    if not isinstance(name, str):
        raise DskdError(f"data.task must be a GLUE task name (one of: {known}), got {name!r}.")
    normalized = _normalize_task_name(name)
    if normalized in GLUE_TASKS:
        return GLUE_TASKS[normalized]
    close = difflib.get_close_matches(normalized, GLUE_TASKS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DskdError(
        f"data.task: unknown GLUE task {name!r}.{hint} Set data.task to one of: {known}."
    )


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


def tokenize_split(ds: datasets.Dataset, tokenizer, max_length: int, in_memory: bool = False) -> datasets.Dataset:
    """Tokenize text_a (and text_b) into input_ids, attention_mask and, if the tokenizer
    makes them, token_type_ids. No padding here: :func:`collate` pads each batch to its
    longest example, which wastes far less compute than padding to max_length.
    ``in_memory``: keep the result in memory instead of a cache file beside ``ds``'s files
    (Glitter's candidate pool, a folder every rank reads)."""
    text_columns = [column for column in ("text_a", "text_b") if column in ds.column_names]

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[column] for column in text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    return ds.map(
        encode,
        batched=True,
        remove_columns=text_columns,
        desc="tokenize",
        load_from_cache_file=not in_memory,
        keep_in_memory=in_memory,
    )


_PADDED_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized rows to the batch's longest and stack them.

    Returns input_ids, attention_mask, token_type_ids (when present), ``labels`` (long
    for classification, float32 for regression) and ``idx``.
    """
    longest = max(len(feature["input_ids"]) for feature in features)
    batch: dict[str, torch.Tensor] = {}
    for column in _PADDED_COLUMNS:
        if column not in features[0]:
            continue
        pad_value = pad_token_id if column == "input_ids" else 0
        padded = torch.full((len(features), longest), pad_value, dtype=torch.long)
        for row, feature in enumerate(features):
            values = torch.as_tensor(feature[column], dtype=torch.long)
            padded[row, : len(values)] = values
        batch[column] = padded
    labels = torch.as_tensor([feature["label"] for feature in features])
    batch["labels"] = labels.float() if labels.is_floating_point() else labels.long()
    batch["idx"] = torch.as_tensor([feature["idx"] for feature in features], dtype=torch.long)
    return batch


# ------------------------------------------------- training-split transforms (holdout, noise)


def split_holdout(ds: datasets.Dataset, share: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training part, held-out part): ``round(share * n)`` examples chosen by a seeded
    permutation (rows keep their ``idx``), or (ds, None) when ``share`` is 0."""
    count = round(share * len(ds))
    if count == 0:
        return ds, None
    if count >= len(ds):
        raise DskdError(f"`data.holdout` {share} holds out {count} of the {len(ds)} training examples; "
                        "leave some to train on")
    order = np.random.default_rng(seed).permutation(len(ds))
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    return ds.select(kept).flatten_indices(), ds.select(held).flatten_indices()


def label_noise(labels: np.ndarray, num_labels: int, rate: float, kind: str, seed: int,
                flip: dict[int, int] | None = None) -> np.ndarray:
    """Noisy copy of ``labels``. ``symmetric``: exactly ``round(rate * n)`` examples, chosen
    by a seeded permutation, get one of the other classes uniformly. ``asymmetric``: for
    each source class c of ``flip`` (default c -> c + 1 for all but the last class),
    ``round(rate * n_c)`` of its examples become ``flip[c]``."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    if kind == "symmetric":
        chosen = rng.permutation(len(labels))[: round(rate * len(labels))]
        noisy[chosen] = (labels[chosen] + rng.integers(1, num_labels, size=len(chosen))) % num_labels
        return noisy
    mapping = flip if flip is not None else {c: c + 1 for c in range(num_labels - 1)}
    for source, target in sorted(mapping.items()):
        rows = np.flatnonzero(labels == source)
        noisy[rng.permutation(rows)[: round(rate * len(rows))]] = target
    return noisy


def apply_label_noise(ds: datasets.Dataset, task: TaskSpec, noise) -> tuple[datasets.Dataset, int]:
    """``ds`` with noisy ``label`` (config ``data.label_noise``) and the true one kept as
    ``clean_label``; returns it and how many labels changed."""
    if task.is_regression:
        raise DskdError(f"`data.label_noise` flips class labels; {task.name} is a regression task")
    flip = None
    if noise.flip is not None:
        flip = {}
        for key, target in noise.flip.items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < task.num_labels \
                    or not 0 <= target < task.num_labels or int(key) == target:
                raise DskdError(f"`data.label_noise.flip.{key}`: {key} -> {target} is not a change between two of "
                                f"{task.name}'s classes 0..{task.num_labels - 1}")
            flip[int(key)] = target
    clean = np.asarray(ds["label"], dtype=np.int64)
    noisy = label_noise(clean, task.num_labels, noise.rate, noise.kind, noise.seed, flip)
    ds = ds.remove_columns("label").add_column("label", noisy.tolist()).add_column("clean_label", clean.tolist())
    return ds, int((noisy != clean).sum())
