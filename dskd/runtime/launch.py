"""Which launcher started this process, and the torch.distributed environment that implies.

DeepSpeed reads no ``SLURM_*`` variable; without ``RANK``/``WORLD_SIZE``/``MASTER_*`` it falls
back to mpi4py discovery, which aborts under plain ``srun`` when mpi4py is installed without
PMI support (../shared/notes/hpc-on-one-machine.md). So dskd fills those variables itself,
before DeepSpeed starts, from whichever launcher it finds (first match wins):

* ``env``: ``RANK`` and ``WORLD_SIZE`` already set, by torchrun (``torchrun``), the
  deepspeed launcher (``deepspeed``) or by hand; ``MASTER_ADDR``/``MASTER_PORT`` must be too.
* ``mpirun``: Open MPI's ``OMPI_COMM_WORLD_*``. The master is ``MASTER_ADDR`` when given, else
  rank 0's host name broadcast with mpi4py when it is installed, else 127.0.0.1 when every
  rank is on this node.
* ``srun``: a Slurm job step's ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``; the
  master is the step's first node, the port ``20000 + job id mod 12000``: all ranks of a job
  agree without talking, two jobs on one node meet only when their ids differ by a multiple of
  12000, and the port stays below the kernel's ephemeral range (``slurm_port``).
* ``single``: none of the above, one process.

Inconsistent environments (a rank outside the world, ``RANK`` without ``WORLD_SIZE``, the
batch script of a multi-task Slurm job running dskd without ``srun``) stop with a message.

Threads (``choose_threads``, applied by the CLI before torch is imported): ``OMP_NUM_THREADS``
when set, else ``SLURM_CPUS_PER_TASK``, else the CPUs of this process's affinity mask divided by
the ranks of the job on this node. OpenMP threads also sleep instead of spinning while they wait
(``OMP_WAIT_POLICY=PASSIVE``) unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set: spinning
threads that share a core with another busy process slow a run several times over
(docs/benchmarks.md, "Threads under CPU contention").

This module imports no torch: the CLI reads it before torch starts its thread pool.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dskd.errors import DskdError


@dataclass(frozen=True)
class ThreadChoice:
    """The OpenMP threads of one rank, where the number came from, and the wait policy."""

    threads: int
    source: str  # "given", "from SLURM_CPUS_PER_TASK" or "default: N CPU(s) / M local rank(s)"
    wait_policy: str  # what OpenMP threads do between parallel regions

    def describe(self) -> str:
        return f"OMP_NUM_THREADS={self.threads} ({self.source}), {self.wait_policy}"


@dataclass(frozen=True)
class Launch:
    launcher: str
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int
    cpus: int = 0  # the CPUs this process may run on (its affinity mask; what Slurm bound the task to)
    threads: ThreadChoice | None = None

    def describe(self) -> str:
        return (f"[launch] {self.launcher}: {self.world} rank(s), this is rank {self.rank} (local {self.local_rank}), "
                f"master {self.master_addr}:{self.master_port}, {self.cpus} CPU(s), "
                + (self.threads.describe() if self.threads else "OMP_NUM_THREADS=unset"))

    def cpu_warning(self) -> str | None:
        """More OpenMP threads than CPUs: the threads of this rank share cores (an `srun` without
        --cpus-per-task under Slurm 22.05-23.02 binds each task to one core)."""
        if self.threads is None or self.threads.threads <= self.cpus:
            return None
        return (f"[launch] warning: rank {self.rank} may run on {self.cpus} CPU(s) but "
                f"OMP_NUM_THREADS={self.threads.threads}, so its threads share cores; under Slurm give srun "
                "--cpus-per-task (slurm/lib.sh does), elsewhere lower OMP_NUM_THREADS")


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise DskdError(f"the launch environment has {name}={env.get(name)!r}; expected an integer") from None


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The range the kernel hands out to ``bind(port 0)`` and to every outgoing connection."""
    try:
        low, high = map(int, Path(path).read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port free on ``host`` now, below the ephemeral range. A port that ``bind(0)`` picked
    is itself ephemeral: between its probe and the master's listen, any outgoing connection
    of another job on the node (gloo opens many) may be given it, and the rendezvous then
    fails with EADDRINUSE. Ports below the range are only ever taken by an explicit bind."""
    low = 20000  # above the ports services listen on (Slurm 6817-6819, TensorBoard 6006, Jupyter 8888)
    high = ephemeral_ports()[0]
    pick = random.SystemRandom()  # not the seeded global generator: two seeded jobs would agree
    for _ in range(tries if high - low > 1000 else 0):
        port = pick.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range on this node: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("vm", "gpu[03-05,09]", "a01,b02")."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[([0-9]+))?", nodelist)
    if not match:
        raise DskdError(f"cannot read the first host of SLURM node list {nodelist!r}; set MASTER_ADDR")
    return match.group(1) + (match.group(2) or "")


def _from_env(env) -> Launch:
    if "WORLD_SIZE" not in env:
        raise DskdError("RANK is set but WORLD_SIZE is not; launch with torchrun, the deepspeed launcher or "
                        "launchers/*.sh, or unset RANK for a single process")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    world = _int(env, "WORLD_SIZE")
    if missing and world > 1:
        raise DskdError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not; every rank needs the master's "
                        "address and port (torchrun and the deepspeed launcher set them)")
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed" if "CROSS_RANK" in env else "env"
    return Launch(launcher, _int(env, "RANK"), world, int(env.get("LOCAL_RANK", 0)),
                  env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT") or free_port()))


def _from_mpirun(env) -> Launch:
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
    launcher = "mpirun"
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        try:
            from mpi4py import MPI
        except Exception:  # not installed, or installed without a usable MPI library
            MPI = None
        if MPI is not None:
            addr = MPI.COMM_WORLD.bcast(socket.gethostname() if rank == 0 else None, root=0)
            # MPI's work is done (gloo/NCCL carry the training); finalize now, because dskd
            # leaves with os._exit and mpirun treats an unfinalized exit as a crash.
            MPI.Finalize()
            launcher = "mpirun (master from mpi4py)"
        elif int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)) == world:
            addr = "127.0.0.1"  # every rank on this node
        else:
            raise DskdError("mpirun across nodes: pass the master's address (mpirun -x MASTER_ADDR=<host of rank 0>) "
                            "or install mpi4py (pip install 'dskd[mpi]') so rank 0's host can be broadcast")
    return Launch(launcher, rank, world, local, addr, int(env.get("MASTER_PORT", 29500)))


def slurm_port(job_id: int) -> int:
    """The master port of a Slurm job: every rank computes it alone. 20000-31999 stays below
    Linux's default ephemeral range (32768-60999): on a busy node, a port in that range may be
    the local end of any outgoing connection, and the master could not listen on it. A constant
    band, not this node's range, since all nodes of the job must agree on it."""
    return 20000 + job_id % 12000


def _from_srun(env) -> Launch:
    if "SLURM_STEP_NUM_TASKS" not in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        raise DskdError(
            f"this is the batch script of a {env['SLURM_NTASKS']}-task Slurm job, not a job step: start dskd "
            "with `srun` (one task per GPU), as the templates in slurm/ do"
        )
    world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
    rank, local = _int(env, "SLURM_PROCID"), int(env.get("SLURM_LOCALID", 0))
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    addr = env.get("MASTER_ADDR") or first_host(nodes)
    port = int(env.get("MASTER_PORT") or slurm_port(int(env.get("SLURM_JOB_ID", 0))))
    return Launch("srun", rank, world, local, addr, port)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _count(env, name: str) -> int | None:
    """A positive integer variable, or None when unset or not one (then a default applies)."""
    value = env.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _slurm_tasks_here(env) -> int | None:
    """This node's tasks from SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2 on nodes 0-2, 1 on node 3)."""
    per_node: list[int] = []
    for item in filter(None, env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")).split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            return None
        per_node += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0")) if env.get("SLURM_NODEID", "0").isdigit() else 0
    return per_node[node] if node < len(per_node) else None


def local_ranks(env) -> int:
    """The ranks of this job on this node, read as ``_detect`` reads the launcher (1: one process).
    Where a launcher does not say, all ranks count as local: too few threads rather than too many."""
    if "RANK" in env:
        found = _count(env, "LOCAL_WORLD_SIZE") or _count(env, "LOCAL_SIZE") or _count(env, "WORLD_SIZE")
    elif "OMPI_COMM_WORLD_RANK" in env:
        found = _count(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or _count(env, "OMPI_COMM_WORLD_SIZE")
    elif "SLURM_PROCID" in env:
        found = (_slurm_tasks_here(env) or _count(env, "SLURM_NTASKS_PER_NODE")
                 or _count(env, "SLURM_STEP_NUM_TASKS") or _count(env, "SLURM_NTASKS"))
    else:
        found = 1
    return found or 1


def choose_threads(env, cpus: int, local: int) -> ThreadChoice:
    """OMP_NUM_THREADS when set, else SLURM_CPUS_PER_TASK, else this process's CPUs shared by the
    local ranks (at least 1); and OpenMP threads sleep while they wait unless told otherwise."""
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given:
        first = given.split(",")[0].strip()  # OpenMP allows a list per nesting level; torch uses the first
        if not first.isdigit() or int(first) < 1:
            raise DskdError(f"OMP_NUM_THREADS={given!r} is not a positive integer; set e.g. OMP_NUM_THREADS=2, or "
                            f"unset it for the default ({max(1, cpus // max(1, local))} on this node)")
        threads, source = int(first), "given"
    elif _count(env, "SLURM_CPUS_PER_TASK"):
        threads, source = _count(env, "SLURM_CPUS_PER_TASK"), "from SLURM_CPUS_PER_TASK"
    else:
        threads, source = max(1, cpus // max(1, local)), f"default: {cpus} CPU(s) / {local} local rank(s)"
    if env.get("OMP_WAIT_POLICY"):
        wait = f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} (given)"
    elif env.get("GOMP_SPINCOUNT"):
        wait = f"GOMP_SPINCOUNT={env['GOMP_SPINCOUNT']} (given)"
    else:
        wait = "OMP_WAIT_POLICY=PASSIVE (default)"
    return ThreadChoice(threads, source, wait)


_applied: ThreadChoice | None = None  # what configure_threads chose for this process


def applied_threads() -> ThreadChoice | None:
    return _applied


def configure_threads(env=None) -> ThreadChoice:
    """Choose the threads and export them: OpenMP (libgomp) reads its variables once, when
    torch is imported, so this runs before; if torch is already there, its pool is resized."""
    global _applied
    env = os.environ if env is None else env
    choice = choose_threads(env, cpu_count(), local_ranks(env))
    env["OMP_NUM_THREADS"] = str(choice.threads)
    torch = sys.modules.get("torch")
    if choice.wait_policy.endswith("(default)"):
        if torch is None:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        else:  # too late: OpenMP read its settings when torch loaded it
            choice = dataclasses.replace(choice, wait_policy="OpenMP's wait policy (torch was imported first)")
    if torch is not None:
        torch.set_num_threads(choice.threads)
    _applied = choice
    return choice


def detect(env=None) -> Launch:
    environ = os.environ if env is None else env
    threads = _applied if env is None and _applied else choose_threads(environ, cpu_count(), local_ranks(environ))
    return dataclasses.replace(_detect(environ), cpus=cpu_count(), threads=threads)


def _detect(env) -> Launch:
    if "RANK" in env:
        launch = _from_env(env)
    elif "OMPI_COMM_WORLD_RANK" in env:
        launch = _from_mpirun(env)
    elif "SLURM_PROCID" in env:
        launch = _from_srun(env)
    else:
        launch = Launch("single", 0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()))
    if launch.world < 1 or not 0 <= launch.rank < launch.world or not 0 <= launch.local_rank < launch.world:
        raise DskdError(f"inconsistent launch environment ({launch.launcher}): rank {launch.rank}, local rank "
                        f"{launch.local_rank}, world size {launch.world}")
    return launch


def apply(launch: Launch) -> None:
    """Export what torch.distributed and DeepSpeed read."""
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world), LOCAL_RANK=str(launch.local_rank),
                      MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
