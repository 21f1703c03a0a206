"""training.group_by_length: length-grouped micro-batches (dskd.data.batches.epoch_batches)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_GLUE, assert_same_run, needs_shared, run_dskd, write_config

from dskd.data import epoch_batches, example_lengths, padding_efficiency
from dskd.errors import DskdError
from dskd.methods import load_experiment

LENGTHS = np.random.default_rng(0).integers(3, 60, 1003)


def _flat(per_rank):
    return [i for batches in per_rank for batch in batches for i in batch]


@pytest.mark.parametrize("world, grad_accum", [(1, 1), (2, 3), (3, 2)])
def test_grouped_batches_use_exactly_the_examples_random_batches_use(world, grad_accum):
    grouped = [epoch_batches(1003, 2, 7, r, world, 8, grad_accum, LENGTHS, 5) for r in range(world)]
    random = [epoch_batches(1003, 2, 7, r, world, 8, grad_accum) for r in range(world)]
    assert [len(b) for b in grouped] == [len(b) for b in random]  # same count on every rank, as random
    assert len({len(b) for b in grouped}) == 1 and len(grouped[0]) % grad_accum == 0
    assert all(len(batch) == 8 for b in grouped for batch in b)
    flat = _flat(grouped)
    assert len(flat) == len(set(flat))  # each example at most once per epoch, across ranks
    assert sorted(flat) == sorted(_flat(random))  # and the very examples random batching uses this epoch


def test_grouped_batches_are_deterministic_per_seed_and_epoch():
    first = epoch_batches(1003, 4, 1, 1, 2, 8, 1, LENGTHS, 5)
    assert first == epoch_batches(1003, 4, 1, 1, 2, 8, 1, list(LENGTHS), 5)
    assert first != epoch_batches(1003, 5, 1, 1, 2, 8, 1, LENGTHS, 5)
    assert first != epoch_batches(1003, 4, 2, 1, 2, 8, 1, LENGTHS, 5)


def test_hand_example_sorted_windows_striped_across_ranks_longest_first():
    lengths = [3, 8, 1, 6, 2, 7, 4, 5]  # by length, longest first: 1, 5, 3, 7, 6, 0, 4, 2
    one = epoch_batches(8, 0, 3, 0, 1, 2, 1, lengths, megabatch=100)
    assert one[0] == [1, 5]  # the longest micro-step first
    assert sorted(map(sorted, one)) == [[0, 6], [1, 5], [2, 4], [3, 7]]
    # Two ranks, one example each: every micro-step is a sorted pair, its longer example on rank 0.
    ranks = [epoch_batches(8, 0, 3, r, 2, 1, 1, lengths, megabatch=100) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == one
    # The batch order is still shuffled: other seeds give other orders of the same micro-steps.
    orders = {tuple(map(tuple, epoch_batches(8, 0, s, 0, 1, 2, 1, lengths, megabatch=100))) for s in range(20)}
    assert len(orders) > 1 and all(order[0] == (1, 5) for order in orders)


def test_equal_lengths_give_exactly_the_random_batches():
    # A corpus job's blocks all have data.max_length tokens: grouping changes nothing there.
    for rank in (0, 1):
        assert epoch_batches(103, 1, 5, rank, 2, 8, 3, [32] * 103) == epoch_batches(103, 1, 5, rank, 2, 8, 3)


def test_every_micro_step_is_striped_across_ranks_so_they_pad_alike():
    # Each micro-step is split across the ranks by striding its length-sorted examples: rank r's
    # longest is the step's r-th longest, so the ranks' padded lengths are the step's top `world`.
    for megabatch in (1, 5):
        per_rank = [epoch_batches(1003, 0, 7, r, 4, 8, 1, LENGTHS, megabatch) for r in range(4)]
        for step in zip(*per_rank, strict=True):
            together = sorted((LENGTHS[i] for batch in step for i in batch), reverse=True)
            assert [max(LENGTHS[batch]) for batch in step] == together[:4]


@pytest.mark.parametrize("overrides, message", [
    ({"training.group_by_length_megabatch": 0}, r"`training.group_by_length_megabatch` must be at least 1, got 0"),
    ({"finetune.group_by_length": "yes"}, r"`finetune.group_by_length`"),
])
def test_bad_grouping_keys_are_named(tmp_path, overrides, message):
    with pytest.raises(DskdError, match=message):
        load_experiment(write_config(tmp_path / "c.yaml", overrides))


@needs_shared("glue", "SST-2")
def test_padding_on_the_real_sst2_train_file():
    from dskd.config import TeacherConfig
    from dskd.data import get_task, load_split, tokenize_split
    from dskd.models import load_tokenizer

    tokenizer = load_tokenizer(TeacherConfig(tokenizer="pkg://bert-base-uncased"))
    raw = load_split(get_task("sst2"), str(SHARED_GLUE), "train", None)
    train = tokenize_split(raw, tokenizer, 64, in_memory=True)
    lengths = example_lengths(train)
    assert len(lengths) == 67349 and lengths.max() == 64
    assert abs(lengths.mean() - 13.3) < 0.1
    picked = train.select(range(5, 67349, 997))  # through an index mapping, as data.train_limit and holdout make
    assert example_lengths(picked).tolist() == [len(row["input_ids"]) for row in picked]
    # The docs/results.md shape (batch 32, one rank) and two ranks: real tokens / padded tokens.
    for world in (1, 2):
        grouped = [b for r in range(world) for b in epoch_batches(len(train), 0, 1, r, world, 32, 1, lengths)]
        random = [b for r in range(world) for b in epoch_batches(len(train), 0, 1, r, world, 32, 1)]
        grouped_share, random_share = padding_efficiency(grouped, lengths), padding_efficiency(random, lengths)
        # Measured: 0.955 / 0.331 on one rank, 0.953 / 0.331 on two (2.9x fewer tokens computed per real token).
        assert grouped_share > 0.94 and random_share < 0.34, (grouped_share, random_share)
        assert max(lengths[grouped[0]]) == 64  # the longest micro-step first


@pytest.mark.slow
def test_resume_mid_epoch_with_group_by_length_is_exact(session_tmp):
    cfg = write_config(session_tmp / "grouped.yaml", {"training.group_by_length": True, "training.grad_accum": 2,
                                                       "training.group_by_length_megabatch": 2})
    full, split = session_tmp / "grouped-full", session_tmp / "grouped-split"
    done = run_dskd(["distill", "--config", cfg, "--output", full, "--deepspeed", "ds_configs/zero0_fp32.json"],
                    session_tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "micro-batches grouped by length" in done.stderr
    halted = run_dskd(["distill", "--config", cfg, "--output", split, "--deepspeed", "ds_configs/zero0_fp32.json",
                       "--set", "training.halt_after_steps=3"], session_tmp)
    assert "halted after step 3" in halted.stderr, halted.stderr[-3000:]
    resumed = run_dskd(["distill", "--config", cfg, "--output", split, "--deepspeed", "ds_configs/zero0_fp32.json",
                        "--resume"], session_tmp)
    assert "at step 3 of 16 (epoch 0)" in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads((full / "metrics.json").read_text())["step"] == 16
    assert_same_run(full, split)
