"""Input errors answer before the heavy libraries load: the config (schema and --set) is checked
torch-free, and a misspelled key or command gets a suggestion."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import REPO, dskd_env

HEAVY = ("torch", "transformers", "datasets", "deepspeed")


def _dskd(args: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dskd", *args], cwd=REPO, env=dskd_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    return proc, time.perf_counter() - start


def test_a_set_typo_is_answered_before_torch_is_imported(tmp_path):
    out = tmp_path / "x"
    proc, seconds = _dskd(["distill", "--config", "configs/tiny.yaml", "--output", str(out),
                           "--set", "training.learning_rate=1"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(
        "dskd: error: configs/tiny.yaml (with --set): unknown key `training.learning_rate`; did you mean "
        "`training.lr`? Known keys here: attention_images, batch_size, ")
    assert len(proc.stderr.splitlines()) == 1 and not out.exists()
    # Importing torch alone takes several seconds; the check itself about 0.3 s on an idle machine.
    assert seconds < 3, seconds


def test_loading_and_validating_a_config_imports_no_heavy_library(tmp_path):
    """In a fresh process: dskd.config, and the CLI up to the config error, leave torch & co. unloaded."""
    code = ("import sys; from dskd.config import load_config; load_config('configs/tiny.yaml', ['training.lr=1']); "
            "from dskd.cli import main; code = main(['distill', '--config', 'configs/tiny.yaml', '--output', "
            "'unused', '--set', 'training.epochs=many']); "
            f"print(code, [m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dskd_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout == "2 []\n", proc.stderr[-2000:]
    assert proc.stderr == ("dskd: error: configs/tiny.yaml (with --set): `training.epochs` must be a number, "
                           "got 'many'\n")


@pytest.mark.parametrize("word, suggestion", [("distil", "distill"), ("fine-tune", "finetune"), ("evalute", "evaluate")])
def test_a_misspelled_command_gets_a_suggestion(tmp_path, word, suggestion):
    proc, _ = _dskd([word, "--config", "configs/tiny.yaml"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        f"dskd: error: unknown command `{word}`; did you mean `dskd {suggestion}`? Commands: finetune, distill, "
        "cache-teacher, augment, train-probes, plan, schema, report, evaluate, robustness, export")


def test_an_unknown_command_without_a_close_one_lists_them(tmp_path):
    proc, _ = _dskd(["frobnicate"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith(
        "dskd: error: unknown command `frobnicate`. Commands: finetune, distill, ")


def test_a_random_teacher_is_refused_before_torch_is_imported(tmp_path):
    """The quick-start config without teacher.path: refused at once, in the CLI's early check."""
    code = ("import sys; from dskd.cli import main; code = main(['distill', '--config', 'configs/quickstart.yaml', "
            "'--output', 'unused']); "
            f"print(code, [m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dskd_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout == "2 []\n", proc.stderr[-2000:]
    assert proc.stderr.startswith("dskd: error: `dskd distill` would use a randomly initialised teacher: "
                                  "`teacher.path` is not set")
    assert not (REPO / "unused").exists()
