"""Shared test helpers: paths, a tiny experiment, and running dskd as real processes."""

from __future__ import annotations

import hashlib
import os

# The Triton kernels run on CPU through the interpreter, which must be chosen before
# anything imports triton (../shared/notes/hpc-on-one-machine.md §3). On a GPU node,
# DSKD_TEST_CUDA=1 keeps the real compiler.
if os.environ.get("DSKD_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The real data (GLUE, vocabularies, WikiText-2, robustness sets) sits in ../shared beside the
# checkout; DSKD_SHARED points elsewhere. Tests reading it go through needs_shared/require_shared,
# so a clone without it skips them, naming what is missing.
SHARED = Path(os.environ.get("DSKD_SHARED") or REPO.parent / "shared")
SHARED_DATA = SHARED / "data"
SHARED_GLUE = SHARED_DATA / "glue"
BERT_VOCAB = REPO / "dskd" / "resources" / "bert-base-uncased" / "vocab.txt"

# Small enough for seconds per run, big enough to cross an epoch boundary and a
# mid-epoch checkpoint: 256 examples / batch 16 = 16 steps per epoch on one rank.
TINY = {
    "seed": 7,
    "data": {"task": "sst2", "path": "pkg://glue-sample", "max_length": 32, "train_limit": 256, "dev_limit": 64},
    # random_ok: the tests distil from this never-trained teacher on purpose (the machinery, not accuracy)
    "teacher": {"arch": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64}, "tokenizer": "pkg://bert-base-uncased",
                "random_ok": True},
    "student": {"init_from_teacher": True, "layers": 1},
    "losses": {"hard_ce": {"weight": 0.5}, "soft_kd": {"weight": 0.5, "temperature": 2.0}},
    "training": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "log_every": 2},
    "finetune": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "log_every": 2},
}


def _shared_missing(parts: tuple[str, ...]) -> str | None:
    path = SHARED_DATA.joinpath(*parts)
    if path.exists():
        return None
    return (f"needs ../shared/data ({path} is missing; put the shared data beside the checkout, or set DSKD_SHARED "
            "to the folder holding data/)")


def needs_shared(*parts: str) -> pytest.MarkDecorator:
    """Marker: skip unless ``SHARED_DATA/parts`` exists (checked before any fixture is built)."""
    reason = _shared_missing(parts)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def require_shared(*parts: str) -> Path:
    """``SHARED_DATA/parts``, or skip the calling test or fixture, naming what is missing."""
    reason = _shared_missing(parts)
    if reason is not None:
        pytest.skip(reason)
    return SHARED_DATA.joinpath(*parts)


def write_config(path: Path, overrides: dict | None = None) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    for dotted, value in (overrides or {}).items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def dskd_env(tmp_root: Path) -> dict:
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_root / "hf-datasets"),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
    )
    return env


def run_dskd(args: list, tmp_root: Path, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``dskd ARGS`` on one rank, or through launchers/local.sh on ``nproc`` ranks."""
    args = [str(a) for a in args]
    if nproc == 1:
        cmd = [sys.executable, "-m", "dskd", *args]
    else:
        cmd = ["bash", str(REPO / "launchers" / "local.sh"), str(nproc), *args]
    return subprocess.run(cmd, cwd=REPO, env=dskd_env(tmp_root), capture_output=True, text=True, timeout=timeout)


def assert_same_run(a: Path, b: Path) -> None:
    """Two finished runs ended on bitwise the same exported model and the same metrics (the
    check behind every "resumed run equals the uninterrupted one" test)."""
    import json

    import torch
    from safetensors.torch import load_file

    wa, wb = (load_file(str(run / "model" / "model.safetensors")) for run in (a, b))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:5]
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())


def tree_digest(folder: Path) -> dict[str, str]:
    """Content hash of every file under ``folder``: proves a run was left untouched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dskd")


@pytest.fixture(scope="session")
def two_rank_reference(session_tmp) -> Path:
    """TINY distilled on two ranks with ZeRO-2, uninterrupted: what resumed and killed two-rank
    runs of the same data and optimizer settings must end equal to."""
    out = session_tmp / "full-zero2_fp32"
    cfg = write_config(session_tmp / "resume-zero2_fp32.yaml", {"training.save_every": 3})
    proc = run_dskd(["distill", "--config", cfg, "--deepspeed", "ds_configs/zero2_fp32.json", "--output", out],
                    session_tmp, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out
