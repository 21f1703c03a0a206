"""A real single-node Slurm cluster (Debian's slurm-wlm + munge) for the tests, started by
hand as in ../shared/notes/hpc-on-one-machine.md §1: no systemd, everything under one folder,
traffic on 127.0.0.1. The node advertises 4 fake GPUs (GRES backed by /dev/null and friends)
so the templates' ``--gpus-per-node`` header is accepted; CUDA stays unavailable and dskd runs
on CPU."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_reason() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    absent = [d for d in (*DAEMONS, "sbatch", "scontrol") if shutil.which(d) is None]
    if absent:
        return (f"{', '.join(absent)} not installed; install Debian's slurm-wlm and munge "
                "(apt-get install slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        return "the single-node test cluster runs its daemons as root (SlurmUser=root)"
    return None


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *cmd, timeout=60, check=True, **kw):
        return subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check, **kw)

    def start(self) -> None:
        root, host = self.root, socket.gethostname().split(".")[0]
        munge = root / "munge"
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        munge.mkdir(exist_ok=True)
        munge.chmod(0o711)  # munged refuses a socket directory others cannot traverse
        key = munge / "munge.key"
        key.write_bytes(Path("/etc/munge/munge.key").read_bytes() if Path("/etc/munge/munge.key").is_file()
                        else os.urandom(128))
        key.chmod(0o400)
        cpus = os.cpu_count() or 2
        # Count-only GPUs are not accepted by slurmd 22.05; any character device will do.
        (root / "gres.conf").write_text("".join(f"NodeName={host} Name=gpu File={dev}\n"
                                                for dev in ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")))
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s):
        # 10 s keeps the requeue tests from idling two minutes each.
        self.conf.write_text(f"""ClusterName=dskdtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/munge.socket.2,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd.%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
InactiveLimit=0
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=4000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self.run("munged", f"--key-file={key}", f"--socket={munge}/munge.socket.2", f"--pid-file={munge}/munged.pid",
                 f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed")
        self.run("slurmctld", "-i")
        self.run("slurmd")
        deadline = time.time() + 30
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.25)
        raise RuntimeError(f"the test node did not become idle (state {state!r}); see {root}/log")

    def job_state(self, job: str) -> dict:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return fields

    def wait(self, job: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            fields = self.job_state(job)
            if fields.get("JobState") in until:
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.job_state(job).get('JobState')} after {timeout} s")

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        self.run("scontrol", "shutdown", check=False)
        for name in ("slurmctld.pid", *(p.name for p in self.root.glob("slurmd.*.pid"))):
            pid_file = self.root / name
            if not pid_file.is_file():
                continue
            pid = int(pid_file.read_text().split()[0])
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended just now
                    pass
        self.run("munged", "--stop", f"--socket={self.root}/munge/munge.socket.2", check=False)
