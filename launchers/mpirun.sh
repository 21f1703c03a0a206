#!/usr/bin/env bash
# dskd under Open MPI's mpirun, one node:  launchers/mpirun.sh 2 distill --config C --output runs/x
# Several nodes: HOSTFILE=hosts MASTER_ADDR=<first host> launchers/mpirun.sh 8 distill ...
# dskd reads OMPI_COMM_WORLD_* itself; mpi4py (pip install 'dskd[mpi]') is only needed to find
# the master across nodes when MASTER_ADDR is not given.
set -euo pipefail
source "$(dirname "$0")/_ranks.sh"
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: [HOSTFILE=f MASTER_ADDR=h] $0 NPROC <dskd subcommand> [args...]" >&2
  exit 2
fi
nproc=$1; shift
python=${PYTHON:-python3}
args=(-np "$nproc" --bind-to none -x PATH -x DSKD_EXIT_FILE)
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE") || args+=(--oversubscribe --mca btl self,vader --mca oob_tcp_if_include lo)
# One node: a port free here, not torch's fixed 29500, which two jobs on this node would share.
if [ -z "${HOSTFILE:-}" ]; then
  MASTER_PORT=$(master_port "$python"); export MASTER_PORT
fi
for var in PYTHONPATH LD_LIBRARY_PATH VIRTUAL_ENV MASTER_ADDR MASTER_PORT DS_ACCELERATOR GLOO_SOCKET_IFNAME OMP_NUM_THREADS HF_HUB_OFFLINE HF_DATASETS_OFFLINE \
           HF_DATASETS_CACHE NCCL_SOCKET_IFNAME TRITON_INTERPRET; do
  [ -n "${!var:-}" ] && args+=(-x "$var")
done
run_reporting mpirun "${args[@]}" "$python" -m dskd "$@"
