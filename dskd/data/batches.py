"""Tokenisation and batches: per-batch padding, and the seeded batch orders an exact resume relies on."""

from __future__ import annotations

import datasets
import torch


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


COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "label", "idx")  # what a batch is made of


def collate(features: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Pad tokenised rows to the batch's longest and stack them, with transformers'
    ``DataCollatorWithPadding`` (the tokenizer's own padding; ``models.load_tokenizer`` makes it
    pad on the right, which the capture hooks and the teacher cache rely on).

    Returns input_ids, attention_mask, token_type_ids (when the tokenizer makes them),
    ``labels`` (long for classification, float32 for regression) and ``idx``; other columns of
    the rows are left out."""
    from transformers import DataCollatorWithPadding

    rows = [{key: feature[key] for key in COLUMNS if key in feature} for feature in features]
    return dict(DataCollatorWithPadding(tokenizer, return_tensors="pt")(rows))


def epoch_batches(n: int, epoch: int, seed: int, rank: int, world: int, batch_size: int, grad_accum: int,
                  skip: int = 0):
    """This rank's micro-batches for one epoch: a seeded permutation, equal work on every rank.
    After ``k`` micro-batches per rank the first ``k x batch_size x world`` examples of the order
    have been used, whatever ``world`` is; ``skip`` leaves out such a prefix (a run resumed on
    another number of ranks, ``dskd.training.rescale``)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()[skip:]
    mine = order[rank::world][: len(order) // world]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]
    return batches[: len(batches) // grad_accum * grad_accum]


def loader(dataset, batches: list[list[int]], tokenizer, collate_fn=None):
    """A DataLoader over the given index batches, padded by :func:`collate` (or made by
    ``collate_fn``, a task's ``collator``)."""
    # Each DataLoader iterator draws a seed from the generator it is given, by default
    # the global torch RNG that dropout uses. A private generator keeps that stream
    # independent of where loaders are created, which an exact resume relies on.
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn or (lambda rows: collate(rows, tokenizer)),
        generator=torch.Generator(),
    )


def eval_loader(dataset, tokenizer, batch_size: int, rank: int = 0, world: int = 1, collate_fn=None):
    """This rank's share of ``dataset`` (every ``world``-th example), in order."""
    shard = list(range(rank, len(dataset), world))
    return loader(dataset, [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)], tokenizer,
                  collate_fn)


def first_batches(dataset, batch_size: int, count: int, tokenizer, device, collate_fn=None) -> list[dict]:
    """The first ``count`` batches of ``dataset``, in order: fixed held-out batches."""
    n = min(count * batch_size, len(dataset))
    index = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return [{k: v.to(device) for k, v in b.items()} for b in loader(dataset, index, tokenizer, collate_fn)]
