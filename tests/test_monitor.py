"""What a user watches: the batch log's [train] lines, the progress bar, and TensorBoard (grad
norm, epoch, eval loss, config text, custom-scalars layout, HParams session and status)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, dskd_env, run_dskd, write_config
from dskd.training import hparams as hp
from dskd.training.monitor import duration, progress_mode, scalars_layout, train_line


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


def _run_raw(args: list, root) -> subprocess.CompletedProcess:
    """``dskd ARGS`` with stderr kept byte for byte (text mode would turn a bar's \\r into \\n)."""
    proc = subprocess.run([sys.executable, "-m", "dskd", *map(str, args)], cwd=REPO, env=dskd_env(root),
                          capture_output=True, timeout=300)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def _events(tb_dir):
    from tensorboard.backend.event_processing import event_file_loader

    return [(f.name, ev) for f in sorted(tb_dir.iterdir()) for ev in event_file_loader.EventFileLoader(str(f)).Load()]


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _hparams_records(tb_dir):
    """{plugin tag: (file name, HParamsPluginData)} of every hparams summary, in file order."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = []
    for name, ev in _events(tb_dir):
        for v in ev.summary.value:
            if v.metadata.plugin_data.plugin_name == "hparams":
                found.append((v.tag, name, plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)))
    return found


def test_progress_mode_is_a_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress_mode("auto", Tty()) == "bar" and progress_mode("auto", io.StringIO()) == "log"
    assert progress_mode("log", Tty()) == "log" and progress_mode("bar", io.StringIO()) == "bar"


def test_train_line_reads_as_documented():
    line = train_line(40, 200, 0.4, {"total": 0.69314, "hard_ce": 0.5, "soft_kd": 0.25, "attention_kl/L1": 9.0},
                      5e-5, 1.23456, 85.26, 1234.0, 12.4, 48.0)
    assert line == ("[train] step 40/200 epoch 0.40 | loss 0.6931 hard_ce 0.5000 soft_kd 0.2500 | lr 5.00e-05 | "
                    "grad_norm 1.235 | 85.3 samples/s 1.2k tokens/s | 12s, ETA 48s")
    assert [duration(s) for s in (0.4, 59.6, 61, 3599, 3660, 90061)] == ["0s", "1m00s", "1m01s", "59m59s", "1h01m",
                                                                         "25h01m"]


def test_hparams_keep_the_swept_keys_first_and_only_what_the_role_uses():
    from dskd.config import to_dict
    from dskd.methods import load_experiment

    cfg = to_dict(load_experiment(REPO / "configs" / "tiny.yaml"))
    argv = ["dskd", "distill", "--config", "c.yaml", "--set", "training.lr=3e-4", "--set=seed=5",
            "--deepspeed", "ds_configs/zero0_fp32.json", "--set", "losses.soft_kd.temperature=4"]
    got = hp.run_hparams(cfg, "distill", argv, 2)
    assert list(got)[:4] == ["training.lr", "seed", "training.deepspeed", "losses.soft_kd.temperature"]
    assert got["training.lr"] == cfg["training"]["lr"] and got["world_size"] == 2
    assert got["losses.soft_kd.weight"] == 0.5 and got["student.layers"] == 1
    assert not [k for k in got if k.startswith("finetune.")]
    assert None not in got.values() and "null" not in got.values() and "teacher.path" not in got  # unset: left out
    assert len(got) < 25
    finetune = hp.run_hparams(cfg, "finetune", ["dskd", "finetune", "--deepspeed", "x.json"], 1)
    assert list(finetune)[0] == "finetune.deepspeed" and "finetune.lr" in finetune
    assert not [k for k in finetune if k.startswith(("training.", "losses.", "student."))]


def test_the_layout_overlays_each_layerwise_terms_layers():
    layout = scalars_layout(["hard_ce", "attention_kl"], ["attention_kl"], ["eval/accuracy", "eval/loss"])
    (kind, [pattern]) = layout["per layer"]["attention_kl by student layer"]
    assert kind == "Multiline"
    assert [t for t in ("train/loss/attention_kl/L1", "train/loss/attention_kl/L12", "train/loss/attention_kl",
                        "train/loss/hard_ce/L1") if re.search(pattern, t)] == ["train/loss/attention_kl/L1",
                                                                              "train/loss/attention_kl/L12"]
    (_, [terms]) = layout["losses"]["train: every loss term"]
    assert [t for t in ("train/loss/hard_ce", "train/loss/total", "train/loss/attention_kl/L1") if re.search(terms, t)] \
        == ["train/loss/hard_ce", "train/loss/total"]


GRAD_NORM_SCRIPT = """
import copy, sys, torch
from dskd.training import engine as eng
from dskd.training.module import backward_and_step
from dskd.config import TrainingConfig

eng.init_distributed()
stage = sys.argv[1]
training = TrainingConfig(batch_size=4, grad_accum=2, lr=1e-2, max_grad_norm=0.05)
ds, _ = eng.load_ds_config(f"ds_configs/zero{stage}_fp32.json", training)
torch.manual_seed(0)
module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
reference = copy.deepcopy(module)
engine = eng.initialize(module, ds, training, lambda step: 1.0)
g = torch.Generator().manual_seed(1)
batches = [(torch.randn(4, 8, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(2)]
norms = [backward_and_step(engine, torch.nn.functional.cross_entropy(engine(x), y)) for x, y in batches]
# By hand: the mean of the two micro-batch losses (DeepSpeed divides by grad_accum), by autograd.
loss = sum(torch.nn.functional.cross_entropy(reference(x), y) for x, y in batches) / 2
grads = torch.autograd.grad(loss, list(reference.parameters()))
print(norms[0] is None, float(norms[1]), float(torch.sqrt(sum((gr ** 2).sum() for gr in grads))))
"""


@pytest.mark.parametrize("stage", ["0", "2"])
def test_grad_norm_is_the_global_norm_before_clipping(tmp_path, stage):
    proc = _ok(subprocess.run([sys.executable, "-c", GRAD_NORM_SCRIPT, stage], cwd=REPO, env=dskd_env(tmp_path),
                              capture_output=True, text=True, timeout=300))
    first_is_none, got, expected = proc.stdout.strip().splitlines()[-1].split()
    assert first_is_none == "True"  # not an accumulation boundary
    assert float(got) == pytest.approx(float(expected), rel=1e-5) and float(expected) > 0.05  # clipping was on


def test_dev_loss_is_the_cross_entropy_or_squared_error():
    from dskd.data.tasks import get_task as task_spec
    from dskd.training.evaluation import dev_loss

    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 0, 1])
    by_hand = -(torch.log_softmax(logits, -1)[torch.arange(3), labels]).mean()
    assert dev_loss(task_spec("sst2"), logits.numpy(), labels.numpy()) == pytest.approx(float(by_hand))
    assert dev_loss(task_spec("stsb"), torch.tensor([[1.0], [3.0]]).numpy(), torch.tensor([2.0, 2.0]).numpy()) == 1.0


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    cfg = write_config(root / "c.yaml", {"training.log_every_seconds": 0, "training.attention_images": 0})
    out = root / "run"
    proc = _ok(_run_raw(["distill", "--config", cfg, "--output", out, "--set", "training.lr=2e-3"], root))
    return root, cfg, out, proc


def test_a_redirected_log_has_train_lines_with_every_term_and_no_bar(logged_run):
    _, _, out, proc = logged_run
    assert "\r" not in proc.stderr  # no progress-bar redraws in a batch log
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[train] ")]
    scalars = _scalars(out / "tensorboard")
    # TINY: 256 examples / batch 16 = 16 steps per epoch, 2 epochs, log_every 2.
    assert [int(re.search(r"step (\d+)/32 ", line)[1]) for line in lines] == list(range(2, 33, 2))
    for line in lines:
        step = int(re.search(r"step (\d+)/", line)[1])
        fields = dict(re.findall(r"(loss|hard_ce|soft_kd|grad_norm) ([0-9.e+-]+)", line))
        assert float(fields["loss"]) == pytest.approx(scalars["train/loss/total"][step], abs=1e-4)
        assert float(fields["hard_ce"]) == pytest.approx(scalars["train/loss/hard_ce"][step], abs=1e-4)
        assert float(fields["grad_norm"]) == pytest.approx(scalars["train/grad_norm"][step], rel=1e-3)
        assert f"epoch {step / 16:.2f} |" in line and "samples/s" in line and "tokens/s" in line
        assert (", ETA " in line) == (step < 32) or step == 32
    assert scalars["train/epoch"][16] == 1.0 and scalars["train/grad_norm"][2] > 0
    assert sorted(scalars["eval/loss"]) == [16, 32] and all(v > 0 for v in scalars["eval/loss"].values())
    assert sorted(scalars["eval/seconds"]) == [16, 32] and scalars["eval/examples_per_s"][32] > 0
    assert re.search(r"\[eval\] step 32/32 .* loss=[0-9.]+ \(best accuracy=", proc.stderr)


def test_tensorboard_has_the_config_the_layout_and_a_finished_session(logged_run):
    from tensorboard.plugins.hparams import api_pb2

    _, cfg, out, _ = logged_run
    events = _events(out / "tensorboard")
    texts = {v.tag: v.tensor.string_val[0].decode() for _, ev in events for v in ev.summary.value
             if v.metadata.plugin_data.plugin_name == "text"}
    assert "training.lr=2e-3" in texts["config/text_summary"] and "    training:" in texts["config/text_summary"]
    assert any(v.tag == "custom_scalars__config__" for _, ev in events for v in ev.summary.value)
    records = _hparams_records(out / "tensorboard")
    start = next(r for tag, _, r in records if tag == "_hparams_/session_start_info").session_start_info
    assert start.hparams["training.lr"].number_value == 0.002 and start.hparams["data.task"].string_value == "sst2"
    assert "finetune.lr" not in start.hparams
    experiment = next(r for tag, _, r in records if tag == "_hparams_/experiment").experiment
    # The swept key is marked as differing: the dashboard sorts those first, the rest by name.
    assert [i.name for i in experiment.hparam_infos if i.differs] == ["training.lr"]
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/accuracy", "eval/loss"]
    ends = [(name, r.session_end_info.status) for tag, name, r in records if tag == "_hparams_/session_end_info"]
    assert len(ends) == 1 and ends[0][0].endswith(hp.STATUS_SUFFIX) and ends[0][1] == api_pb2.STATUS_SUCCESS


def test_a_failed_run_is_marked_failed_and_a_resume_clears_it(logged_run):
    from tensorboard.plugins.hparams import api_pb2

    root, cfg, _, _ = logged_run
    out = root / "diverges"
    proc = run_dskd(["distill", "--config", cfg, "--output", out, "--set", "training.lr=1e30",
                     "--set", "training.save_every=1"], root)
    assert proc.returncode == 2 and "not finite" in proc.stderr
    ends = [r.session_end_info.status for tag, _, r in _hparams_records(out / "tensorboard")
            if tag == "_hparams_/session_end_info"]
    assert ends == [api_pb2.STATUS_FAILURE]
    # A new start of the run (here: the session opened again) removes the stale Failure record.
    from dskd.training.monitor import Monitor

    monitor = Monitor(out / "tensorboard", True, 1, 0, "distill", "log")
    monitor.start_session({}, "", "distill", [], 1, type("T", (), {"main_metric": "accuracy"})(), [], [])
    monitor.close()
    assert not [r for tag, _, r in _hparams_records(out / "tensorboard") if tag == "_hparams_/session_end_info"]


def test_on_a_terminal_the_bar_shows_the_loss(logged_run):
    root, cfg, _, _ = logged_run
    proc = _ok(_run_raw(["distill", "--config", cfg, "--output", root / "bar", "--set", "training.progress=bar",
                         "--set", "training.epochs=1"], root))
    assert "[train] " not in proc.stderr
    redraws = proc.stderr.split("\r")
    assert len(redraws) > 10  # a bar redraws in place
    assert any(re.search(r"16/16 .*loss=[0-9.]+, lr=[0-9.e+-]+, grad_norm=[0-9.e+-]+", r) for r in redraws), redraws
    assert json.loads((root / "bar" / "run.json").read_text())["status"] == "completed"
