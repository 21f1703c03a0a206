"""GLUE task definitions: where each task is stored, how its labels read, how it is scored."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from dskd.errors import DskdError

SPLITS = ("train", "dev")


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task is stored on disk and scored.

    The training loop, evaluation and export see a task through a small interface, so that
    another kind of job (a corpus for masked-LM distillation) can be a second task class:
    ``name``, ``main_metric`` (higher is better), ``num_labels``, ``prediction`` (the model
    output that is scored), ``score(predictions, labels)`` and ``model_class`` (the
    transformers Auto class its trained model loads with)."""

    prediction = "logits"
    model_class = "AutoModelForSequenceClassification"

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

    def score(self, predictions, labels) -> dict[str, float]:
        """The task's metrics of ``predictions`` (this task's model outputs) against ``labels``."""
        from dskd.data.metrics import compute_metrics

        return compute_metrics(self, predictions, labels)

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


