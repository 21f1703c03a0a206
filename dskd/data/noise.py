"""Transforms of the training split: a held-out share (``data.holdout``) and injected label noise
(``data.label_noise``), both seeded so every rank and every resume sees the same split."""

from __future__ import annotations

import datasets
import numpy as np

from dskd.data.tasks import TaskSpec
from dskd.errors import DskdError


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
