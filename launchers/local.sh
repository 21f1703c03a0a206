#!/usr/bin/env bash
# Run any dskd subcommand on NPROC ranks of this node (GPU if there is one, else CPU/gloo).
#   launchers/local.sh 2 distill --config configs/tiny.yaml --output runs/tiny2
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC <dskd subcommand> [args...]   e.g. $0 2 distill --config configs/tiny.yaml --output runs/x" >&2
  exit 2
fi
nproc=$1; shift
python=${PYTHON:-python3}
if ! "$python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  # Keep gloo on loopback: a single node needs no other interface.
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
  # Each rank would otherwise start one thread per core and the ranks would fight over them.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
fi
exec "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m dskd "$@"
