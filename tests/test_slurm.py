"""The sbatch templates on a real single-node Slurm cluster, and an mpirun launch.

The cluster (tests/slurm_cluster.py) is started once for this module and stopped at the
end. Every job runs dskd through the real `slurm/distill.sbatch` with tiny models on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, dskd_env
from slurm_cluster import Cluster, missing_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))]

# Two tasks, one fake GPU and one CPU each; 1024 examples / (2 ranks x 16) = 32 steps per epoch.
JOB = ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def cluster():
    # munged wants every parent of its socket traversable by all; pytest's tmp folders are 0700.
    root = Path(tempfile.mkdtemp(prefix="dskd-slurm-"))
    root.chmod(0o711)
    c = Cluster(root)
    c.start()
    c.env.update({k: v for k, v in dskd_env(c.root).items() if k not in c.env or k.startswith(("HF_", "DS_"))})
    c.env.update(DSKD_VENV=sys.prefix, GLOO_SOCKET_IFNAME="lo", PYTHON=sys.executable)
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


def _submit(cluster, out_log, *args) -> str:
    proc = cluster.run("sbatch", "--parsable", *JOB, "-o", out_log, "slurm/distill.sbatch", *args, cwd=REPO)
    return proc.stdout.strip().split(";")[0]


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_two_task_job_completes_with_both_ranks(cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(cluster, log, "--config", "configs/tiny.yaml", "--output", out)
    state = cluster.wait(job, timeout=300)
    text = log.read_text(errors="replace")
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert "[launch] srun: 2 rank(s), this is rank 0 (local 0), master" in text
    # srun got --cpus-per-task from slurm/lib.sh and the cluster binds tasks (task/affinity): each
    # rank runs on the one CPU it asked for, with one OpenMP thread (env.sh), and none warns.
    assert ", 1 CPU(s), OMP_NUM_THREADS=1" in text and "[launch] warning" not in text
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "completed"
    assert json.loads((out / "metrics.json").read_text())["step"] == 32
    assert _scalars(out / "tensorboard")["train/loss/total"][-1][0] == 32


def test_a_signalled_job_requeues_resumes_and_finishes_every_step(cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = _submit(cluster, log, "--config", "configs/tiny.yaml", "--output", out, "--set", "training.epochs=4",
                  "--set", "training.save_every=1000")
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the first run is training (its batch log shows step 10+)
        if log.is_file() and any(f"[train] step {n}/128 " in log.read_text(errors="replace") for n in range(10, 60)):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the job did not start training: {log.read_text(errors='replace')[-2000:] if log.is_file() else 'no log'}")
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@120 sends before the time limit
    state = cluster.wait(job, timeout=400)
    text = log.read_text(errors="replace")
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    assert "[preempt] SIGUSR1: checkpoint at step" in text and "requeueing job" in text
    assert text.count("[launch] srun: 2 rank(s)") == 2
    stopped = int(text.split("[preempt] SIGUSR1: checkpoint at step ")[1].split(";")[0])
    assert 0 < stopped < 128
    # The same number of steps as an uninterrupted run (4 epochs x 32), logged without a gap.
    assert json.loads((out / "metrics.json").read_text())["step"] == 128
    steps = [s for s, _ in _scalars(out / "tensorboard")["train/loss/total"]]
    assert steps[-1] == 128 and sorted(set(steps)) == list(range(4, 129, 4))


def test_a_corpus_job_from_the_general_template_requeues_and_resumes_mid_stream(cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    # 215 blocks / (2 ranks x 8) = 13 steps per epoch, 6 epochs.
    proc = cluster.run("sbatch", "--parsable", "-N", "1", *JOB, "-o", log, "slurm/general.sbatch", "--config",
                       "configs/general/tiny.yaml", "--output", out, "--set", "training.epochs=6", "--set",
                       "training.save_every=1000", cwd=REPO)
    job = proc.stdout.strip().split(";")[0]
    deadline = time.time() + 240
    while time.time() < deadline:
        if log.is_file() and any(f"[train] step {n}/78 " in log.read_text(errors="replace") for n in range(6, 50)):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the job did not start training: {log.read_text(errors='replace')[-2000:] if log.is_file() else 'no log'}")
    cluster.run("scancel", "--signal=USR1", job)
    state = cluster.wait(job, timeout=400)
    text = log.read_text(errors="replace")
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    assert "[preempt] SIGUSR1: checkpoint at step" in text and "[resume] continuing from checkpoint" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "corpus" and metrics["step"] == 78


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed (apt-get install openmpi-bin)")
def test_mpirun_launch_with_open_mpi_and_mpi4py(tmp_path):
    pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed or finds no MPI library")
    env = dict(dskd_env(tmp_path), OMP_NUM_THREADS="1")
    env.pop("PYTHON", None)
    env["PYTHON"] = sys.executable
    out = tmp_path / "run"
    proc = subprocess.run(["timeout", "-k", "5", "300", "bash", "launchers/mpirun.sh", "2", "distill", "--config",
                           "configs/tiny.yaml", "--output", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[launch] mpirun (master from mpi4py): 2 rank(s)" in proc.stderr
    assert ":29500," not in proc.stderr  # a free port of this node, not torch's fixed default
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert os.path.isfile(out / "metrics.json")


def test_a_sweep_array_shares_one_command_and_reports_one_table(cluster, tmp_path):
    sweep = tmp_path / "lr.txt"
    sweep.write_text("--set training.lr=1.0e-3\n\n--set training.lr=3.0e-4\n")
    root = tmp_path / "sweep"
    proc = cluster.run("sbatch", "--parsable", "--array=1-2", "--cpus-per-task=1", "-o", tmp_path / "sweep-%a.out",
                       "slurm/sweep.sbatch", sweep, root, "--config", "configs/tiny.yaml", cwd=REPO)
    array = proc.stdout.strip().split(";")[0]
    for task in ("1", "2"):
        state = cluster.wait(f"{array}_{task}", timeout=300)
        assert state["JobState"] == "COMPLETED", (tmp_path / f"sweep-{task}.out").read_text()[-3000:]
    report = subprocess.run([sys.executable, "-m", "dskd", "report", str(root)], cwd=REPO, capture_output=True,
                            text=True, env=cluster.env)
    assert report.returncode == 0, report.stderr
    lines = report.stdout.strip().splitlines()
    assert lines[0] == "| run | training.lr | accuracy | step | status |"
    assert {line.split(" | ")[1] for line in lines[2:]} == {"0.001", "0.0003"}
    assert all(line.endswith("| 64 | completed |") for line in lines[2:])
    from tensorboard.backend.event_processing import event_file_loader

    plugins = {v.metadata.plugin_data.plugin_name for f in (root / "run-1" / "tensorboard").iterdir()
               for ev in event_file_loader.EventFileLoader(str(f)).Load() for v in ev.summary.value}
    assert "hparams" in plugins
