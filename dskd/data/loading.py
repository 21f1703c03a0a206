"""A task's data for a run: both splits tokenised (rank 0 first, so the other ranks read the
``datasets`` cache it wrote) and the training split's transforms, with content hashes that
name the data in a teacher cache's identity."""

from __future__ import annotations

import hashlib
import json

from dskd.data.batches import tokenize_split
from dskd.data.corpus import CorpusTask, load_corpus
from dskd.data.glue import load_split
from dskd.data.noise import apply_label_noise, split_holdout
from dskd.data.tasks import get_task
from dskd.runtime import dist


def data_fingerprint(raw) -> str:
    """A hash of a raw split's content (texts, labels, idx), independent of where it is stored."""
    digest = hashlib.sha256()
    for column in sorted(raw.column_names):
        digest.update(column.encode())
        digest.update(json.dumps(raw.data.column(column).to_pylist()).encode())
    return digest.hexdigest()[:16]


def task_for(cfg, mlm: bool = False):
    """The job's task: the GLUE task ``data.task``, or a corpus job's (``data.corpus``); ``mlm``:
    its loss terms need masked inputs (``dskd.losses.uses_mlm``)."""
    if cfg.data.corpus is None:
        return get_task(cfg.data.task)
    return CorpusTask(mlm, cfg.data.corpus.mask_probability, cfg.seed)


def load_data(cfg, task, tokenizer, fingerprints: dict | None = None):
    """The tokenised train and dev splits (a corpus job: training and held-out blocks).
    ``fingerprints``, when given, receives each raw split's size and content hash."""
    splits = {}
    for order in (0, 1):
        if (dist.rank() == 0) == (order == 0):
            if cfg.data.corpus is not None:
                splits["train"], splits["dev"] = load_corpus(cfg.data.corpus, tokenizer, cfg.data.max_length,
                                                             fingerprints)
            else:
                _load_glue(cfg, task, tokenizer, fingerprints, splits)
        dist.barrier()
    return splits["train"], splits["dev"]


UNLABELED = -100  # the label of a `data.unlabeled` row (PyTorch's ignore_index)


def _load_glue(cfg, task, tokenizer, fingerprints, splits) -> None:
    for split, limit in (("train", cfg.data.train_limit), ("dev", cfg.data.dev_limit)):
        if split == "train" and cfg.data.unlabeled:
            raw = with_unlabeled_rows(task, cfg.data)
        else:
            raw = load_split(task, cfg.data.path, split, limit)
        if fingerprints is not None:
            fingerprints[split] = {"examples": len(raw), "hash": data_fingerprint(raw)}
        splits[split] = tokenize_split(raw, tokenizer, cfg.data.max_length)


def with_unlabeled_rows(task, data_cfg):
    """The training split of ``data.unlabeled``: the first ``train_limit`` rows as they are, then up to
    ``unlabeled_limit`` more (null: the rest) with their label replaced by ``UNLABELED``. Rows keep
    their ``idx``, so a teacher cache written with the same config covers all of them."""
    from dskd.errors import DskdError

    if task.is_regression:
        raise DskdError(f"`data.unlabeled` marks rows by the label {UNLABELED}, which a regression task "
                        f"({task.name}) cannot tell from a score; drop it")
    limit = None if data_cfg.unlabeled_limit is None else data_cfg.train_limit + data_cfg.unlabeled_limit
    raw = load_split(task, data_cfg.path, "train", limit)
    if len(raw) <= data_cfg.train_limit:
        raise DskdError(f"`data.unlabeled`: the training split has {len(raw)} rows, none after `data.train_limit` "
                        f"({data_cfg.train_limit}); lower data.train_limit or drop data.unlabeled")
    labelled = data_cfg.train_limit
    return raw.map(lambda row, i: {"label": row["label"] if i < labelled else UNLABELED}, with_indices=True)


def labelled_rows(train_set) -> int:
    """How many training rows carry a gold label (all of them without ``data.unlabeled``)."""
    return sum(1 for label in train_set["label"] if label != UNLABELED)


def training_split(cfg, task, train_set):
    """The examples trained on, the held-out ones (``data.holdout``, chosen first so they keep
    their labels) and how many training labels ``data.label_noise`` changed (None: no noise)."""
    train_set, holdout_set = split_holdout(train_set, cfg.data.holdout, cfg.seed)
    noisy = None
    if cfg.data.label_noise is not None:
        train_set, noisy = apply_label_noise(train_set, task, cfg.data.label_noise)
    return train_set, holdout_set, noisy
