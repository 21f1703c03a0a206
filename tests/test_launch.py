"""Launcher detection: which environment means what, and which ones are refused."""

from __future__ import annotations

import pytest

from dskd.errors import DskdError
from dskd.runtime.launch import choose_threads, configure_threads, detect, first_host, local_ranks, slurm_port


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
    assert launch.master_port == 23456  # 20000 + 123456 mod 12000
    # Every job's port lies below Linux's default ephemeral range (32768-60999).
    assert [slurm_port(j) for j in (0, 11999, 12000, 10**9 + 7)] == [20000, 31999, 20000, 24007]
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
    if name == "deepspeed":  # a free port of its own, not the deepspeed launcher's fixed 29500
        assert "master 127.0.0.1:" in proc.stderr and "master 127.0.0.1:29500," not in proc.stderr


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


def test_free_port_is_bindable_and_below_the_ephemeral_range(monkeypatch, tmp_path):
    """Below the range, no other job's outgoing connection can be handed the port between the
    probe and the master's listen (the race behind a CI failure of a 2-rank run)."""
    import socket

    from dskd.runtime import launch

    (tmp_path / "range").write_text("40000\t50000\n")  # the kernel file's format
    assert launch.ephemeral_ports(str(tmp_path / "range")) == (40000, 50000)
    assert launch.ephemeral_ports(str(tmp_path / "absent")) == (32768, 60999)
    low, high = launch.ephemeral_ports()
    ports = {launch.free_port() for _ in range(20)}
    assert len(ports) > 1
    for port in ports:
        assert (20000 <= port < low) if low - 20000 > 1000 else low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # and free
    # A node whose range starts at 20500 leaves no room below it: the kernel's own choice.
    monkeypatch.setattr(launch, "ephemeral_ports", lambda: (20500, high))
    assert low <= launch.free_port() <= high


@pytest.mark.slow
def test_a_taken_master_port_is_one_line_and_the_launcher_stops_the_other_rank(session_tmp, tmp_path):
    """Rank 0 cannot listen: it says so and exits 1 (not 2: rank 1 never sees the problem), and
    launchers/local.sh takes rank 1 down instead of leaving it connected to the wrong socket."""
    import socket
    import subprocess

    from conftest import REPO, dskd_env

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(4)  # accepts into the backlog and never answers, as a stranger's listener
        port = held.getsockname()[1]
        out = tmp_path / "run"
        proc = subprocess.run(["timeout", "-k", "5", "200", "bash", "launchers/local.sh", "2", "distill", "--config",
                               "configs/tiny.yaml", "--output", str(out)], cwd=REPO,
                              env=dict(dskd_env(session_tmp), MASTER_PORT=str(port)), capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dskd: error:")]
    assert errors == [f"dskd: error: rank 0 cannot listen on MASTER_PORT={port} (127.0.0.1): another process holds "
                      "it (another job's rendezvous or a rank left from an earlier run). Set MASTER_PORT to a free "
                      "port, or leave it unset: launchers/local.sh, deepspeed.sh and mpirun.sh pick one"]
    assert "Traceback" not in proc.stderr and not out.exists()


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
    assert launch.describe().endswith(
        "master vm:20005, 1 CPU(s), OMP_NUM_THREADS=8 (given), OMP_WAIT_POLICY=PASSIVE (default)")
    assert launch.cpu_warning() == (
        "[launch] warning: rank 0 may run on 1 CPU(s) but OMP_NUM_THREADS=8, so its threads share cores; under "
        "Slurm give srun --cpus-per-task (slurm/lib.sh does), elsewhere lower OMP_NUM_THREADS")
    assert detect(dict(env, OMP_NUM_THREADS="1")).cpu_warning() is None
    # Unset, the default never outnumbers the CPUs: 1 CPU shared by the 2 ranks of this node is still 1 thread.
    assert detect(env).cpu_warning() is None and detect(env).describe().endswith(
        "1 CPU(s), OMP_NUM_THREADS=1 (default: 1 CPU(s) / 2 local rank(s)), OMP_WAIT_POLICY=PASSIVE (default)")


TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1"}
SRUN = {"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}


@pytest.mark.parametrize("env, cpus, threads, source", [
    ({}, 2, 2, "default: 2 CPU(s) / 1 local rank(s)"),
    ({"OMP_NUM_THREADS": "3"}, 2, 3, "given"),
    ({"OMP_NUM_THREADS": "4,2"}, 8, 4, "given"),  # one count per nesting level: torch's pool is the first
    ({"SLURM_CPUS_PER_TASK": "6"}, 16, 6, "from SLURM_CPUS_PER_TASK"),
    ({"SLURM_CPUS_PER_TASK": "6", "OMP_NUM_THREADS": "1"}, 16, 1, "given"),
    (dict(TORCHRUN, LOCAL_WORLD_SIZE="4"), 16, 4, "default: 16 CPU(s) / 4 local rank(s)"),  # torchrun, local.sh
    (dict(TORCHRUN, LOCAL_SIZE="3"), 16, 5, "default: 16 CPU(s) / 3 local rank(s)"),  # the deepspeed launcher
    (TORCHRUN, 16, 2, "default: 16 CPU(s) / 8 local rank(s)"),  # no local count: every rank may be here
    (dict(TORCHRUN, LOCAL_WORLD_SIZE="4"), 2, 1, "default: 2 CPU(s) / 4 local rank(s)"),  # at least one
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 12, 6,
     "default: 12 CPU(s) / 2 local rank(s)"),
    (dict(SRUN, SLURM_NODEID="1"), 8, 4, "default: 8 CPU(s) / 2 local rank(s)"),
    (dict(SRUN, SLURM_NODEID="3"), 8, 8, "default: 8 CPU(s) / 1 local rank(s)"),  # the last node holds one task
])
def test_threads_per_rank_from_env_cpus_and_local_ranks(env, cpus, threads, source):
    choice = choose_threads(env, cpus, local_ranks(env))
    assert (choice.threads, choice.source, choice.wait_policy) == (threads, source, "OMP_WAIT_POLICY=PASSIVE (default)")


def test_wait_policy_given_is_kept_and_bad_thread_counts_are_refused():
    assert choose_threads({"OMP_WAIT_POLICY": "active"}, 2, 1).wait_policy == "OMP_WAIT_POLICY=active (given)"
    assert choose_threads({"GOMP_SPINCOUNT": "10000"}, 2, 1).wait_policy == "GOMP_SPINCOUNT=10000 (given)"
    for value in ("0", "two"):
        with pytest.raises(DskdError) as info:
            choose_threads({"OMP_NUM_THREADS": value}, 4, 2)
        assert str(info.value) == (f"OMP_NUM_THREADS={value!r} is not a positive integer; set e.g. OMP_NUM_THREADS=2, "
                                   "or unset it for the default (2 on this node)")


def test_configure_threads_exports_the_choice_and_resizes_a_running_torch(monkeypatch):
    import sys
    from types import SimpleNamespace

    import dskd.runtime.launch as launch_module

    monkeypatch.setattr(launch_module, "cpu_count", lambda: 4)
    monkeypatch.setattr(launch_module, "_applied", None)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    env = {}
    assert configure_threads(env).describe() == (
        "OMP_NUM_THREADS=4 (default: 4 CPU(s) / 1 local rank(s)), OMP_WAIT_POLICY=PASSIVE (default)")
    assert env == {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "PASSIVE"}  # read by OpenMP when torch loads it
    # torch already imported (a library caller): its pool is resized; the wait policy can no longer change
    resized = []
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(set_num_threads=resized.append))
    env = dict(TORCHRUN, LOCAL_WORLD_SIZE="2")
    assert configure_threads(env).describe() == (
        "OMP_NUM_THREADS=2 (default: 4 CPU(s) / 2 local rank(s)), OpenMP's wait policy (torch was imported first)")
    assert resized == [2] and env["OMP_NUM_THREADS"] == "2" and "OMP_WAIT_POLICY" not in env


def test_a_run_without_thread_settings_uses_the_default_and_prints_it(tmp_path):
    """A real `dskd finetune` in a fresh process with OMP_NUM_THREADS unset: the [launch] line
    names the default, and torch (imported after the CLI chose) runs with exactly that many."""
    import os
    import subprocess
    import sys

    from conftest import REPO, dskd_env, write_config

    env = dskd_env(tmp_path)
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "SLURM_CPUS_PER_TASK"):
        env.pop(name, None)
    cpus = len(os.sched_getaffinity(0))
    args = ["finetune", "--config", str(write_config(tmp_path / "c.yaml")), "--output", str(tmp_path / "run"),
            "--set", "finetune.max_steps=2", "--set", "data.dev_limit=16"]
    code = ("import os, sys; from dskd.cli import main; code = main(sys.argv[1:]); import torch; "
            "print('torch threads', torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], flush=True); os._exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f", {cpus} CPU(s), OMP_NUM_THREADS={cpus} (default: {cpus} CPU(s) / 1 local rank(s)), "
            "OMP_WAIT_POLICY=PASSIVE (default)\n") in proc.stderr
    assert f"torch threads {cpus} PASSIVE\n" in proc.stdout


@pytest.mark.slow
def test_two_nodes_of_one_rank_end_where_one_node_of_two_ranks_ends(two_rank_reference, session_tmp):
    """Multi-node launch on this one machine: two torchrun agents (`launchers/torchrun.sh` with
    NNODES=2), one rank each, meeting at a c10d rendezvous on 127.0.0.1, train the same job as
    two ranks of one node (`two_rank_reference`, launchers/local.sh) and end on the same bits."""
    import json
    import subprocess

    from conftest import REPO, assert_same_run, dskd_env

    from dskd.runtime.launch import free_port

    port = free_port()
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
