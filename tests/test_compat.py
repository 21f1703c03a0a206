"""A run checkpointed by an older dskd resumes with today's code, bit for bit.

`tests/fixtures/compat/` was written by dskd at commit cab48c2 (before the package was split
into layers): `halted/` is a run of `compat.yaml` stopped by `training.halt_after_steps: 15`
(ZeRO-2, fp32, one rank, with a cls_cosine projection among the trained terms and an SWA
average already in the checkpoint); `expected/` holds the model and metrics that the same
config gave uninterrupted. Moving modules, renaming classes or changing the checkpoint's
client state would break the resume or change the weights, and this test would say so.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO, run_dskd
from safetensors.torch import load_file

FIXTURE = REPO / "tests" / "fixtures" / "compat"
CONFIG = FIXTURE / "compat.yaml"


def _assert_expected(run) -> None:
    want = load_file(str(FIXTURE / "expected" / "model.safetensors"))
    got = load_file(str(run / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:5]
    assert json.loads((run / "metrics.json").read_text()) == json.loads((FIXTURE / "expected" / "metrics.json").read_text())


@pytest.mark.slow
def test_an_older_checkpoint_resumes_to_the_older_uninterrupted_result(tmp_path):
    run = tmp_path / "halted"
    shutil.copytree(FIXTURE / "halted", run)
    result = run_dskd(["distill", "--config", CONFIG, "--output", run, "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[resume] continuing from checkpoint step00000015 at step 15" in result.stderr
    _assert_expected(run)


@pytest.mark.slow
def test_todays_uninterrupted_run_equals_the_older_one(tmp_path):
    run = tmp_path / "full"
    result = run_dskd(["distill", "--config", CONFIG, "--output", run], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_expected(run)
