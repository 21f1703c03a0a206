"""What a new user meets first (issue 23, point 5): `dskd export` refuses to replace a model
unless told, `evaluate --device`, files readable by the group as the umask allows, only the
warnings we know to be noise hidden, `--help` examples that paste, the README's run-folder table
and quick-start install, tests that skip without ../shared.

Most tests share one real tiny run: ZeRO-3 (whose collectives raise torch's deprecation
warnings), written under umask 027 by a process for which the test extra's packages do not
exist, as after the quick start's `pip install -e .`."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, dskd_env, tree_digest, write_config
from dskd.cli import build_parser, main
from dskd.errors import DskdError
from dskd.runtime.dist import resolve_device

RUN_UMASK = 0o027
TEST_EXTRA = ("pytest", "triton", "mpi4py", "jsonschema")
# `python -c` this with dskd's arguments: dskd with the test extra uninstalled, as far as imports go.
WITHOUT_TEST_EXTRA = f"""
import os, sys
class WithoutTestExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TEST_EXTRA!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, WithoutTestExtra())
from dskd.cli import main
code = main(sys.argv[1:])
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)  # as `dskd` does: a ZeRO-3 run can abort in interpreter teardown
"""


@pytest.fixture(scope="module")
def tiny_run(session_tmp):
    root = session_tmp / "user-surface"
    root.mkdir()
    cfg = write_config(root / "tiny.yaml", {"data.train_limit": 64, "data.dev_limit": 32, "training.epochs": 1,
                                            "training.deepspeed": "ds_configs/zero3_fp32.json"})
    out = root / "run"
    old = os.umask(RUN_UMASK)
    try:
        proc = subprocess.run([sys.executable, "-c", WITHOUT_TEST_EXTRA, "distill", "--config", str(cfg), "--output",
                               str(out)], cwd=REPO, env=dskd_env(root), capture_output=True, text=True, timeout=300)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "cfg": cfg, "stderr": proc.stderr, "root": root}


# ---------------------------------------------------------------- dskd export --overwrite

def _export(capsys, *args) -> tuple[int, str, str]:
    code = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_refuses_an_existing_model_folder_unless_overwrite_and_loses_nothing(tiny_run, tmp_path, capsys):
    run, out = tiny_run["out"], tmp_path / "exported"
    assert _export(capsys, "--run", run, "--out", out)[0] == 0
    (out / "vocab.txt").write_text("a file of the model exported before\n")
    before = tree_digest(out)
    code, _, err = _export(capsys, "--run", run, "--out", out)
    assert code == 2 and err.strip().splitlines() == [
        f"dskd: error: --out {out} already holds an exported model; replace it with --overwrite, or choose "
        "another folder"]
    assert tree_digest(out) == before
    # --overwrite replaces the folder as a whole: nothing of the old model stays, nothing is left beside it.
    old = os.umask(0o007)  # the new files follow the umask of this export, not the old files' modes
    try:
        assert _export(capsys, "--run", run, "--out", out, "--overwrite")[0] == 0
    finally:
        os.umask(old)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert (out / "model.safetensors").read_bytes() == (run / "model" / "model.safetensors").read_bytes()
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o660}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    # A folder holding something else is never replaced, --overwrite or not.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    code, _, err = _export(capsys, "--run", run, "--out", other, "--overwrite")
    assert code == 2 and "exists and is not a model folder; choose an empty or new folder" in err
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


# ---------------------------------------------------------------- evaluate --device

def test_evaluate_on_cpu_gives_the_runs_own_dev_metrics(tiny_run, capsys):
    run = tiny_run["out"]
    assert main(["evaluate", "--model", str(run), "--config", str(tiny_run["cfg"]), "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert evaluated == {"task": "sst2", "accuracy": metrics["accuracy"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("command", ["evaluate", "robustness"])
def test_asking_for_cuda_without_a_gpu_is_one_clear_error(tiny_run, capsys, command):
    args = [command, "--config", str(tiny_run["cfg"]), "--device", "cuda"]
    args += ["--model", str(tiny_run["out"])] if command == "evaluate" else [
        "--models", str(tiny_run["out"]), "--output", str(tiny_run["root"] / "robustness"), "--set",
        "data.path=pkg://glue-sample"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dskd: error: --device cuda: no CUDA GPU is visible to this process")
    assert err[0].endswith("use --device cpu or auto")


def test_device_resolution(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DskdError, match=r"^--device cuda:0: no CUDA GPU is visible"):
        resolve_device("cuda:0")
    # A GPU node: auto is this rank's GPU, as training's device; DS_ACCELERATOR=cpu keeps the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DskdError, match=r"^--device cuda:2: this process sees 2 GPU\(s\), cuda:0 to cuda:1$"):
        resolve_device("cuda:2")
    for bad in ("gpu", "cuda:x", "CUDA"):
        with pytest.raises(DskdError, match=r"expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert resolve_device("auto") == torch.device("cpu")


# ---------------------------------------------------------------- file modes

def test_a_runs_files_are_readable_by_the_group_as_the_umask_allows(tiny_run):
    run = tiny_run["out"]
    paths = [run, *run.rglob("*")]
    assert any(p.name == "model.safetensors" for p in paths) and any(p.suffix == ".pt" for p in paths)
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o777 & ~RUN_UMASK, path
        else:  # DeepSpeed makes its zero_to_fp32.py executable by its owner
            assert mode & 0o666 == 0o666 & ~RUN_UMASK and mode & 0o011 == 0, path


# ---------------------------------------------------------------- warnings

def test_known_noisy_warnings_are_hidden_and_others_show(tiny_run):
    # The run above uses ZeRO-3, whose collectives torch deprecates (a FutureWarning per call).
    assert "Warning" not in tiny_run["stderr"], tiny_run["stderr"][-3000:]
    from dskd.cli import _quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_libraries()
        warnings.warn_explicit("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                               "`torch.distributed.reduce_scatter_single` instead.", FutureWarning,
                               "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
        torch.tensor(torch.tensor(1.0))  # torch's own UserWarning: to copy construct from a tensor, use clone()
        warnings.warn_explicit("`torch.distributed.something_else` is deprecated", FutureWarning,
                               "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
        warnings.warn_explicit("`torch.distributed.reduce_scatter_tensor` is deprecated", UserWarning,
                               "ours.py", 1, module="ours")
    shown = [(w.category, str(w.message)[:34]) for w in caught]
    assert shown == [(UserWarning, "To copy construct from a tensor, i"),
                     (FutureWarning, "`torch.distributed.something_else`"),
                     (UserWarning, "`torch.distributed.reduce_scatter_")]


# ---------------------------------------------------------------- --help

def test_help_examples_are_commands_a_user_can_paste():
    text = build_parser().format_help()
    examples = text.split("\nexamples:\n", 1)[1].splitlines()
    commands, current = [], ""
    for line in examples:
        if not line.strip():
            continue
        if current:
            assert line.startswith("    "), f"continuation not indented: {line!r}"
        else:
            assert line.startswith(("  dskd ", "  launchers/")), f"not a command: {line!r}"
        current += line.strip()[:-1] if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    assert not current and len(commands) >= 10
    assert sum(line.endswith(" \\") for line in examples) >= 3  # the long ones keep their continuations
    for command in commands:
        argv = shlex.split(command)
        argv = argv[1:] if argv[0] == "dskd" else argv[2:]  # launchers/local.sh NPROC <subcommand> ...
        build_parser().parse_args(argv)  # argparse exits on anything it does not accept


# ---------------------------------------------------------------- README

def _readme_table(heading: str) -> list[str]:
    section = (REPO / "README.md").read_text().split(f"\n### {heading}\n", 1)[1].split("\n#", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", section, re.MULTILINE)]


def test_the_readme_run_folder_table_lists_what_a_run_folder_holds(tiny_run):
    table = _readme_table("What a run folder holds")
    held = {p.name + ("/" if p.is_dir() else "") for p in tiny_run["out"].iterdir()}
    assert held - set(table) == set(), "README.md's 'What a run folder holds' misses these"
    # The rest are there only sometimes: a lock while running, what --overwrite replaces, method outputs.
    assert set(table) - held == {".lock", ".replaced/", "stage_best/", "trajectory/"}


def _readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"<!-- ci:{marker} -->\n```bash\n", 1)[1].split("\n```", 1)[0]


def test_the_quick_start_installs_no_test_extra_and_ci_runs_the_test_block():
    quick, tests = _readme_block("quickstart"), _readme_block("tests")
    assert 'pip install -e .\n' in quick + "\n" and "[test]" not in quick and "dskd distill" in quick
    assert "pip install -e \".[test]\"" in tests and "python -m pytest" in tests
    # .ci/run extracts the test block with its own awk program: it finds the same commands.
    awk = re.search(r"block=\$\((awk .*? README\.md)\)", (REPO / ".ci" / "run").read_text()).group(1)
    extracted = subprocess.run(["bash", "-c", awk], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert extracted.strip() == tests.strip()


def test_the_quick_start_needs_nothing_from_the_test_extra(tiny_run):
    """The tiny run was made by a process that could import none of the test extra's packages."""
    assert (tiny_run["out"] / "model" / "model.safetensors").is_file()
    assert json.loads((tiny_run["out"] / "run.json").read_text())["status"] == "completed"
