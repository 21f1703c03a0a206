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
    output that is scored; None for ``data.corpus.CorpusTask``, which is evaluated by its
    held-out losses), ``score(predictions, labels)``, ``collator(tokenizer, epoch)`` and
    ``model_class`` (the transformers Auto class its trained model loads with)."""

    prediction = "logits"
    model_class = "AutoModelForSequenceClassification"
    units = "dev examples"  # what the run's opening line counts

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
    # What each output of the model means, by index (a regression's one output has one name).
    class_names: tuple[str, ...] = ()
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

    def collator(self, tokenizer, epoch: int):
        """Rows of a split -> a padded batch (``epoch`` matters only to tasks that re-mask)."""
        from dskd.data.batches import collate

        del epoch
        return lambda rows: collate(rows, tokenizer)

    def split_file(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.train_file if split == "train" else self.dev_file


# The nine GLUE tasks: name, folder, TSV text columns, label column, label values as the TSV
# writes them (class id = position; "-": a regression score), the classes' names in that order
# (the hub's GLUE ClassLabel names; what an export's id2label says), metrics and the main one;
# then what differs from the defaults.
_TABLE = """
cola  CoLA   sentence            label        0,1                                unacceptable,acceptable            matthews_corrcoef  matthews_corrcoef
sst2  SST-2  sentence            label        0,1                                negative,positive                  accuracy           accuracy
mrpc  MRPC   #1_String,#2_String Quality      0,1                                not_equivalent,equivalent          f1,accuracy        f1
qqp   QQP    question1,question2 is_duplicate 0,1                                not_duplicate,duplicate            f1,accuracy        accuracy
stsb  STS-B  sentence1,sentence2 score        -                                  similarity                         pearson,spearman   pearson
mnli  MNLI   sentence1,sentence2 gold_label   entailment,neutral,contradiction   entailment,neutral,contradiction   accuracy           accuracy
qnli  QNLI   question,sentence   label        entailment,not_entailment          entailment,not_entailment          accuracy           accuracy
rte   RTE    sentence1,sentence2 label        entailment,not_entailment          entailment,not_entailment          accuracy           accuracy
wnli  WNLI   sentence1,sentence2 label        0,1                                not_entailment,entailment          accuracy           accuracy
"""
_SPECIAL = {
    "cola": {"headerless_columns": ("source", "label", "notation", "sentence")},
    "mrpc": {"hub_text_columns": ("sentence1", "sentence2")},
    "mnli": {"dev_file": "dev_matched.tsv", "hub_text_columns": ("premise", "hypothesis")},
}


def _parse_table() -> dict[str, TaskSpec]:
    tasks = {}
    for row in _TABLE.strip().splitlines():
        name, folder, texts, label, names, classes, metrics, main = row.split()
        tasks[name] = TaskSpec(
            name, folder, tuple(c.replace("_", " ") for c in texts.split(",")), label,
            None if names == "-" else tuple(names.split(",")), tuple(metrics.split(",")), main,
            class_names=tuple(classes.split(",")), **_SPECIAL.get(name, {}),
        )
    return tasks


GLUE_TASKS: dict[str, TaskSpec] = _parse_table()



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


