#!/usr/bin/env bash
# Run any dskd subcommand on NPROC ranks of this node (GPU if there is one, else CPU/gloo).
#   launchers/local.sh 2 distill --config configs/tiny.yaml --output runs/tiny2
# The ranks are started here, not by torchrun, so that SIGTERM/SIGUSR1 reach them at once and
# nothing kills a rank that is still writing its checkpoint; the exit code is the ranks':
# 0, 2 (input error), 85 (checkpointed on a signal), else the failing rank's.
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  echo "usage: $0 NPROC <dskd subcommand> [args...]   e.g. $0 2 distill --config configs/tiny.yaml --output runs/x" >&2
  exit 2
fi
source "$(dirname "$0")/_ranks.sh"
nproc=$1; shift
python=${PYTHON:-python3}
if ! "$python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  # Keep gloo on loopback: a single node needs no other interface.
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
  # Each rank would otherwise start one thread per core and the ranks would fight over them.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
fi
export MASTER_ADDR=127.0.0.1 WORLD_SIZE=$nproc LOCAL_WORLD_SIZE=$nproc
MASTER_PORT=$(master_port "$python"); export MASTER_PORT
pids=()
for ((r = 0; r < nproc; r++)); do
  RANK=$r LOCAL_RANK=$r "$python" -m dskd "$@" &
  pids+=($!)
done
forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM INT
trap 'forward USR1' USR1
# Wait for every rank. The first that fails (not 0, 2 or 85) takes the others down, since they
# would otherwise wait for it in a collective forever.
codes=()
for pid in "${pids[@]}"; do
  rc=0
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # wait was interrupted by a trapped signal: wait again
  done
  codes+=("$rc")
  case $rc in 0|2|85) ;; *) forward TERM; sleep 5; forward KILL ;; esac
done
trap - TERM INT USR1
final=0
for rc in "${codes[@]}"; do
  case $rc in 0) ;; 2|85) [ "$final" -eq 0 ] && final=$rc ;; *) final=$rc; break ;; esac
done
report_exit "$final"
