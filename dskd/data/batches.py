"""Tokenisation and batches: per-batch padding, and the seeded batch orders an exact resume relies on."""

from __future__ import annotations

import datasets
import numpy as np
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
                  lengths=None, megabatch: int = 50, skip: int = 0):
    """This rank's micro-batches for one epoch: a seeded permutation, equal work on every rank.

    After ``k`` optimizer steps the first ``k x G`` examples of the permutation have been used
    (``G = world x batch_size x grad_accum``, the global batch), however the ranks shared them:
    ``skip`` leaves out such a prefix (a run resumed on another number of ranks with the same
    global batch, ``dskd.training.rescale``).

    ``lengths`` (token counts per example, :func:`example_lengths`): group examples of similar
    length (``training.group_by_length``). The examples are those random batching uses in this
    epoch; each window of ``megabatch`` optimizer steps of the permutation is sorted by length and
    cut into optimizer steps, which then run in a seeded random order, the one holding the
    longest example first (an out-of-memory error shows at once). An optimizer step is cut into
    ``grad_accum`` micro-steps, each split across the ranks by striding, so every rank's
    micro-batch pads to about the same length. Windows and steps are made of whole global
    batches, so which examples an optimizer step averages does not depend on ``world``: a grouped
    run resumes on another number of ranks as exactly as a random one. Equal lengths (a corpus
    job's blocks) give exactly the random batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is not None:
        lengths = np.asarray(lengths)
        if len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
    if lengths is None or n == 0 or lengths.min() == lengths.max():
        rest = order[skip:]
        mine = rest[rank::world][: len(rest) // world]
        batches = [mine[i : i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]
        return batches[: len(batches) // grad_accum * grad_accum]
    span = world * batch_size  # one micro-step's examples, all ranks together
    step_size = span * grad_accum  # one optimizer step's
    if skip % step_size:
        raise ValueError(f"skip {skip} is not a whole number of optimizer steps of {step_size} examples")
    # The random batches above use exactly order[: n // step_size * step_size]: the same examples here.
    used = np.asarray(order[: n // step_size * step_size], dtype=np.int64)
    steps = []
    for start in range(0, len(used), megabatch * step_size):
        window = used[start : start + megabatch * step_size]
        window = window[np.argsort(-lengths[window], kind="stable")]
        steps += [window[i : i + step_size] for i in range(0, len(window), step_size)]
    if not steps:
        return []
    longest = int(np.argmax([lengths[step[0]] for step in steps]))  # a window's first step holds its longest
    shuffled = [j for j in torch.randperm(len(steps), generator=generator).tolist() if j != longest]
    ordered = [steps[j] for j in [longest] + shuffled][skip // step_size :]
    return [step[i : i + span][rank::world].tolist() for step in ordered for i in range(0, step_size, span)]


def grouping_note(lengths, seed: int, rank: int, world: int, batch_size: int, grad_accum: int,
                  megabatch: int) -> str:
    """The log line of ``training.group_by_length``: this rank's padding in epoch 0, grouped and random."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.min() == lengths.max():
        return (f"[data] training.group_by_length changes nothing here: every training example has "
                f"{lengths[0]} tokens (a corpus job's blocks)")
    shares = [padding_efficiency(epoch_batches(len(lengths), 0, seed, rank, world, batch_size, grad_accum, grouped,
                                               megabatch), lengths) for grouped in (lengths, None)]
    return (f"[data] micro-batches grouped by length (training.group_by_length, windows of {megabatch} micro-steps): "
            f"{shares[0]:.0%} of the padded tokens are real in epoch 0 (random batches: {shares[1]:.0%})")


def example_lengths(dataset) -> np.ndarray:
    """Token count of every example of a tokenised split (read from the Arrow column, through
    any ``select``ed index mapping, without decoding the rows)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy()


def padding_efficiency(batches: list[list[int]], lengths) -> float:
    """Real tokens over padded tokens (each batch padded to its longest) of ``batches``."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return real / max(padded, 1)


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
