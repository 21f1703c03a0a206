"""Scaling out: a run resumed on another number of ranks continues the same epoch and the same
optimizer trajectory (dskd/training/rescale.py), with the global batch kept by
`training.global_batch_size`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_dskd, tree_digest, write_config
from dskd.data import epoch_batches

# -------------------------------------------------------------- the data position, unit level


def _order(n: int, seed: int, epoch: int = 0) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


@pytest.mark.parametrize("old_world, old_accum, new_world, new_accum", [(2, 2, 1, 4), (1, 4, 2, 2), (4, 1, 2, 2)])
@pytest.mark.parametrize("grouped", [False, True], ids=["random", "grouped"])
def test_a_new_world_size_continues_the_epoch_without_repeating_or_skipping(old_world, old_accum, new_world,
                                                                            new_accum, grouped):
    """Global batch 16 (batch_size 4) before and after; the old ranks did 3 optimizer steps."""
    n, seed, size, steps_done = 101, 7, 4, 3
    lengths = [(i * 37) % 23 + 2 for i in range(n)] if grouped else None

    def steps(world: int, accum: int, skip: int) -> list[set[int]]:
        per_rank = [epoch_batches(n, 0, seed, r, world, size, accum, lengths, 2, skip=skip) for r in range(world)]
        return [{i for rank in per_rank for batch in rank[s * accum:(s + 1) * accum] for i in batch}
                for s in range(len(per_rank[0]) // accum)]

    before = steps(old_world, old_accum, 0)
    used = set().union(*before[:steps_done])
    after = steps(new_world, new_accum, 16 * steps_done)
    assert len(used) == 48 and not used & set().union(*after)
    if not grouped:
        assert used == set(_order(n, seed)[:48])  # 3 steps x 16: a prefix of the epoch's order, whoever took it
    # Every later optimizer step averages exactly the examples it would have on the old ranks.
    assert after == before[steps_done:] and len(after) == 101 // 16 - steps_done
    # And every optimizer step, from the first, is the one the new layout makes from scratch.
    assert steps(new_world, new_accum, 0) == before


def test_a_move_that_would_change_the_global_batch_is_refused_with_the_fix(tmp_path):
    """This process is one rank; the checkpoint was written by 2."""
    from dskd.errors import DskdError
    from dskd.methods import load_experiment
    from dskd.training import rescale
    from dskd.training.engine import at_world_size

    folder = tmp_path / "run" / "checkpoints" / "step00000005"
    raw = load_experiment(write_config(tmp_path / "a.yaml", {"training.grad_accum": 2})).training
    with pytest.raises(DskdError, match=r"trained on 2 rank\(s\) with a global batch of 64 \(2 x training.batch_size "
                                        r"16 x training.grad_accum 2\); on 1 rank\(s\) it would be 32, .* Resume with "
                                        r"`--set training.global_batch_size=64 --set training.grad_accum=1`"):
        rescale.check(folder, 2, raw, raw, "training")
    fixed = load_experiment(write_config(tmp_path / "b.yaml", {"training.global_batch_size": 64})).training
    assert rescale.check(folder, 2, at_world_size(fixed, 1), fixed, "training") == 2  # 1 x 16 x 4 = 2 x 16 x 2
    assert rescale.check(folder, 1, at_world_size(fixed, 1), fixed, "training") is None  # not moved


# -------------------------------------------------------------- real runs, 2 -> 1 and 1 -> 2 ranks

# No dropout (its per-rank RNG streams cannot move to other ranks); ZeRO-2, so the optimizer state
# is partitioned and must be re-partitioned. 256 examples / global batch 32 = 8 steps per epoch,
# 16 steps; the move happens at step 5, in the middle of epoch 0.
MOVE = {"teacher.arch.dropout": 0.0, "training.deepspeed": "ds_configs/zero2_fp32.json", "training.save_every": 4}
STEPS = 16
# The moved runs differ from the unmoved one only in the order of float additions (micro-batch
# grouping, padding, the all-reduce); measured max|dW| 9.3e-9 (2 -> 1). A resume that loses
# Adam's moments and step count (cleared after the load) ends 6.3e-3 away, Adam at step 11.
ATOL = 1e-6


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def moved(session_tmp):
    root = session_tmp / "world-size"
    root.mkdir()
    cfg = write_config(root / "move.yaml", MOVE)
    fixed = write_config(root / "move-fixed.yaml", dict(MOVE, **{"training.global_batch_size": 32}))
    return root, cfg, fixed


@pytest.fixture(scope="module")
def stayed(moved):
    root, cfg, _ = moved
    _ok(run_dskd(["distill", "--config", cfg, "--output", root / "stayed"], root, nproc=2))
    return root / "stayed"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _adam_steps(run: Path) -> set[float]:
    files = sorted((run / "checkpoints" / f"step{STEPS:08d}").glob("*optim_states.pt"))
    assert files
    states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    inner = [sd.get("base_optimizer_state") or sd["optimizer_state_dict"] for sd in states]  # ZeRO-2 | ZeRO-3
    return {float(s["step"]) for sd in inner for s in sd["state"].values()}


def _assert_ends_like(moved_run: Path, stayed_run: Path, world: int) -> None:
    a, b = _weights(moved_run), _weights(stayed_run)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= ATOL, worst
    assert json.loads((moved_run / "metrics.json").read_text())["step"] == STEPS
    assert json.loads((moved_run / "run.json").read_text())["world_size"] == world
    # Adam went on counting from the checkpoint's step: its state was restored, not restarted.
    assert _adam_steps(moved_run) == {float(STEPS)}
    assert not list((moved_run / "checkpoints").glob("*.universal"))  # the conversion is removed


@pytest.mark.slow
def test_a_run_moved_from_two_ranks_to_one_ends_where_the_two_rank_run_ends(moved, stayed):
    root, cfg, _ = moved
    out = root / "two-to-one"
    # Started without training.global_batch_size: 2 ranks x 16 x grad_accum 1 = 32.
    _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--set", "training.halt_after_steps=5"], root,
                 nproc=2))
    before = tree_digest(out)
    refused = run_dskd(["distill", "--config", cfg, "--output", out, "--resume"], root)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert ("was trained on 2 rank(s) with a global batch of 32 (2 x training.batch_size 16 x training.grad_accum "
            "1); on 1 rank(s) it would be 16") in refused.stderr
    assert "Resume with `--set training.global_batch_size=32`" in refused.stderr
    assert tree_digest(out) == before
    # The fix the message names: the same global batch, now kept by accumulation on one rank.
    proc = _ok(run_dskd(["distill", "--config", cfg, "--output", out, "--resume", "--set",
                         "training.global_batch_size=32"], root))
    assert ("[resume] step00000005 was written by 2 rank(s), this job has 1: optimizer state re-partitioned, "
            "epoch 0 continues after its first 160 examples") in proc.stderr
    assert ("global batch 32 = 1 rank(s) x batch_size 16 x grad_accum 2 (derived from "
            "training.global_batch_size)") in proc.stderr
    _assert_ends_like(out, stayed, 1)


@pytest.mark.slow
def test_a_run_moved_from_one_rank_to_two_ends_where_the_two_rank_run_ends(moved, stayed):
    root, _, fixed = moved
    out = root / "one-to-two"
    _ok(run_dskd(["distill", "--config", fixed, "--output", out, "--set", "training.halt_after_steps=5"], root))
    proc = _ok(run_dskd(["distill", "--config", fixed, "--output", out, "--resume"], root, nproc=2))
    assert "[resume] step00000005 was written by 1 rank(s), this job has 2" in proc.stderr
    _assert_ends_like(out, stayed, 2)
    shutil.rmtree(out)


@pytest.mark.slow
def test_a_length_grouped_run_moved_from_two_ranks_to_one_ends_where_it_would_have(moved, stayed):
    """Grouped batches are whole optimizer steps sorted by length, so a grouped run moves mid-epoch
    as exactly as a random one (windows of 2 steps here, so the grouping does reorder examples)."""
    root, _, fixed = moved
    grouped = ["--set", "training.group_by_length=true", "--set", "training.group_by_length_megabatch=2"]
    reference = root / "grouped-stayed"
    proc = _ok(run_dskd(["distill", "--config", fixed, "--output", reference, *grouped], root, nproc=2))
    assert "[data] micro-batches grouped by length" in proc.stderr
    a, b = _weights(reference), _weights(stayed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3  # not the random batches' trajectory
    out = root / "grouped-two-to-one"
    _ok(run_dskd(["distill", "--config", fixed, "--output", out, "--set", "training.halt_after_steps=5", *grouped],
                 root, nproc=2))
    proc = _ok(run_dskd(["distill", "--config", fixed, "--output", out, "--resume", *grouped], root))
    assert "epoch 0 continues after its first 160 examples" in proc.stderr
    _assert_ends_like(out, reference, 1)
    shutil.rmtree(out)


@pytest.mark.slow
def test_a_zero3_run_moved_from_two_ranks_to_one_keeps_adams_step(moved, stayed):
    """ZeRO-3 partitions the weights too. Its trajectory equals ZeRO-2's to float rounding
    (measured max|dW| 1.2e-7 between the two unmoved 2-rank runs), so the ZeRO-2 run that stayed
    is the reference. DeepSpeed's ZeRO-3 loader shares one Adam step between the parameter
    groups (27 instead of 16 here, 1.2e-4 away) and the first group's weight decay to all (4.4e-5
    away); dskd undoes both, and the moved run ends 1.2e-7 away."""
    root, _, fixed = moved
    out = root / "zero3-two-to-one"
    zero3 = ["--set", "training.deepspeed=ds_configs/zero3_fp32.json"]
    _ok(run_dskd(["distill", "--config", fixed, "--output", out, "--set", "training.halt_after_steps=5", *zero3],
                 root, nproc=2))
    _ok(run_dskd(["distill", "--config", fixed, "--output", out, "--resume", *zero3], root))
    _assert_ends_like(out, stayed, 1)
    shutil.rmtree(out)


def test_a_skip_inside_an_optimizer_step_of_grouped_batches_is_refused():
    """A checkpoint is written between optimizer steps, so what was used is whole steps."""
    lengths = list(range(1, 33))
    assert epoch_batches(32, 0, 7, 0, 2, 4, 1, lengths, skip=8) == epoch_batches(32, 0, 7, 0, 2, 4, 1, lengths)[1:]
    with pytest.raises(ValueError, match="skip 4 is not a whole number of optimizer steps of 8 examples"):
        epoch_batches(32, 0, 7, 0, 2, 4, 1, lengths, skip=4)
    # Equal lengths (a corpus job's blocks) batch at random, so a prefix can be skipped there.
    assert epoch_batches(32, 0, 7, 0, 2, 4, 1, [5] * 32, skip=8) == epoch_batches(32, 0, 7, 0, 2, 4, 1, skip=8)
