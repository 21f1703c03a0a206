"""The data layer: GLUE tasks and their metrics, reading, tokenisation, batches, and the
training split's transforms. Everything here is plain data work; nothing knows about
models, teachers or losses."""

from dskd.data.batches import (
    collate, epoch_batches, eval_loader, example_lengths, first_batches, grouping_note, loader, padding_efficiency,
    tokenize_split,
)
from dskd.data.glue import load_split, read_glue_tsv
from dskd.data.corpus import CorpusTask
from dskd.data.loading import UNLABELED, data_fingerprint, labelled_rows, load_data, task_for, training_split
from dskd.data.noise import apply_label_noise, label_noise, split_holdout
from dskd.data.tasks import GLUE_TASKS, SPLITS, TaskSpec, get_task

__all__ = [
    "GLUE_TASKS", "SPLITS", "UNLABELED", "CorpusTask", "TaskSpec", "apply_label_noise", "collate", "data_fingerprint",
    "epoch_batches", "eval_loader", "example_lengths", "first_batches", "get_task", "grouping_note", "labelled_rows",
    "label_noise", "load_data",
    "load_split", "loader", "padding_efficiency", "read_glue_tsv", "split_holdout", "task_for", "tokenize_split", "training_split",
]
