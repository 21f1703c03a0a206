#!/usr/bin/env bash
# dskd under torchrun. One node:   launchers/torchrun.sh 4 distill --config C --output runs/x
# Several nodes (run on each):     NNODES=2 RDZV=host0:29400 launchers/torchrun.sh 4 distill ...
set -euo pipefail
source "$(dirname "$0")/_ranks.sh"
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: [NNODES=N RDZV=host:port] $0 PROCS_PER_NODE <dskd subcommand> [args...]" >&2
  exit 2
fi
nproc=$1; shift
python=${PYTHON:-python3}
if [ "${NNODES:-1}" -gt 1 ]; then
  : "${RDZV:?set RDZV=host:port of the rendezvous (the first node) for NNODES > 1}"
  run_reporting "$python" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$nproc" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV" -m dskd "$@"
else
  run_reporting "$python" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m dskd "$@"
fi
