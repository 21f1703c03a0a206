"""Launcher detection: which environment means what, and which ones are refused."""

from __future__ import annotations

import pytest

from dskd.errors import DskdError
from dskd.runtime.launch import detect, first_host


def test_single_process():
    launch = detect({})
    assert (launch.launcher, launch.rank, launch.world, launch.master_addr) == ("single", 0, 1, "127.0.0.1")


@pytest.mark.parametrize("extra, name", [({"TORCHELASTIC_RUN_ID": "x"}, "torchrun"), ({"CROSS_RANK": "0"}, "deepspeed"),
                                         ({}, "env")])
def test_torchrun_deepspeed_and_plain_env(extra, name):
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234", **extra}
    launch = detect(env)
    assert (launch.launcher, launch.rank, launch.world, launch.local_rank, launch.master_addr, launch.master_port) == (
        name, 1, 4, 1, "n0", 1234)


def test_srun_step():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    launch = detect(env)
    assert (launch.launcher, launch.rank, launch.world, launch.local_rank) == ("srun", 3, 4, 1)
    assert launch.master_port == 20000 + 123456 % 40000
    assert launch.master_addr in ("gpu07",)  # scontrol (if present) and the fallback parser agree


def test_mpirun_one_node_without_master():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}
    launch = detect(env)
    assert (launch.launcher, launch.rank, launch.world, launch.master_addr, launch.master_port) == (
        "mpirun", 1, 2, "10.0.0.1", 29500)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2, local rank 0, world size 2"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x'; expected an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, "the batch script of a 4-task Slurm job"),
])
def test_inconsistent_environments_are_refused(env, message):
    with pytest.raises(DskdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        detect(env)


@pytest.mark.parametrize("nodelist, host", [("vm", "vm"), ("gpu[03-05,09]", "gpu03"), ("a01,b02", "a01")])
def test_first_host_of_a_node_list(nodelist, host, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the parser, not scontrol
    assert first_host(nodelist) == host


@pytest.mark.slow
@pytest.mark.parametrize("script, name", [("deepspeed.sh", "deepspeed"), ("torchrun.sh", "torchrun")])
def test_launcher_scripts_start_two_ranks(script, name, session_tmp):
    import json
    import subprocess

    from conftest import REPO, dskd_env

    out = session_tmp / f"launcher-{name}"
    proc = subprocess.run(["timeout", "-k", "5", "300", "bash", f"launchers/{script}", "2", "distill", "--config",
                           "configs/tiny.yaml", "--output", str(out), "--set", "training.halt_after_steps=2"],
                          cwd=REPO, env=dskd_env(session_tmp), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[launch] {name}: 2 rank(s), this is rank 0 (local 0)" in proc.stderr
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("script", ["local.sh", "torchrun.sh", "deepspeed.sh"])
def test_launchers_exit_with_the_ranks_code_and_one_line(script, session_tmp, tmp_path):
    """An input error exits 2 with dskd's one line and no launcher failure report (no torchrun
    ChildFailedError traceback)."""
    import subprocess

    from conftest import REPO, dskd_env

    proc = subprocess.run(["timeout", "-k", "5", "300", "bash", f"launchers/{script}", "2", "distill", "--config",
                           "configs/tiny.yaml", "--output", str(tmp_path / "run"), "--set", "training.lr=-1"],
                          cwd=REPO, env=dskd_env(session_tmp), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("dskd: error: configs/tiny.yaml (with --set): `training.lr` must be positive") == 1
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


@pytest.mark.slow
def test_local_launcher_passes_a_signal_on_and_exits_85(session_tmp):
    import json
    import os
    import signal
    import subprocess
    import time

    from conftest import REPO, dskd_env

    out = session_tmp / "launcher-signal"
    proc = subprocess.Popen(["bash", "launchers/local.sh", "2", "distill", "--config", "configs/tiny.yaml", "--output",
                             str(out), "--set", "training.epochs=3"], cwd=REPO, env=dskd_env(session_tmp),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((out / "checkpoints").glob("step*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # training has reached its first checkpoint (end of epoch 1)
    os.kill(proc.pid, signal.SIGUSR1)  # to the launcher only, as `kill -USR1 <pid>` or `scancel -b` would
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 85, err[-3000:]
    assert "[launch] the ranks checkpointed on a signal; exit 85" in err
    assert json.loads((out / "run.json").read_text())["status"] == "preempted"


def test_the_launch_line_shows_the_cpus_and_warns_when_threads_outnumber_them(monkeypatch):
    import dskd.runtime.launch as launch_module

    monkeypatch.setattr(launch_module, "cpu_count", lambda: 1)  # a task srun bound to one core
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "5",
           "SLURM_STEP_NODELIST": "vm", "MASTER_ADDR": "vm"}
    launch = detect(dict(env, OMP_NUM_THREADS="8"))
    assert launch.describe().endswith("master vm:20005, 1 CPU(s), OMP_NUM_THREADS=8")
    assert launch.cpu_warning() == (
        "[launch] warning: rank 0 may run on 1 CPU(s) but OMP_NUM_THREADS=8, so its threads share cores; under "
        "Slurm give srun --cpus-per-task (slurm/lib.sh does), elsewhere lower OMP_NUM_THREADS")
    assert detect(dict(env, OMP_NUM_THREADS="1")).cpu_warning() is None
    assert detect(env).cpu_warning() is None and detect(env).describe().endswith("OMP_NUM_THREADS=unset")


@pytest.mark.slow
def test_two_nodes_of_one_rank_end_where_one_node_of_two_ranks_ends(two_rank_reference, session_tmp):
    """Multi-node launch on this one machine: two torchrun agents (`launchers/torchrun.sh` with
    NNODES=2), one rank each, meeting at a c10d rendezvous on 127.0.0.1, train the same job as
    two ranks of one node (`two_rank_reference`, launchers/local.sh) and end on the same bits."""
    import json
    import socket
    import subprocess

    from conftest import REPO, assert_same_run, dskd_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = session_tmp / "two-nodes"
    env = dict(dskd_env(session_tmp), NNODES="2", RDZV=f"127.0.0.1:{port}")
    cmd = ["timeout", "-k", "5", "300", "bash", "launchers/torchrun.sh", "1", "distill", "--config",
           str(session_tmp / "resume-zero2_fp32.yaml"), "--deepspeed", "ds_configs/zero2_fp32.json", "--output", str(out)]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [node.communicate(timeout=330)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n---\n".join(e[-3000:] for e in errs)
    log = "".join(errs)
    assert "[launch] torchrun: 2 rank(s), this is rank 0 (local 0)" in log  # each node's one rank is local 0
    assert log.count("[launch] torchrun:") == 1  # rank 0 only: the job ran once, not again standalone
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert_same_run(out, two_rank_reference)
