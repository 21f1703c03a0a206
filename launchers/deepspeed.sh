#!/usr/bin/env bash
# dskd under the deepspeed launcher, one node:  launchers/deepspeed.sh 4 distill --config C --output runs/x
# (several nodes: pass a hostfile, see `deepspeed --help`; under Slurm use slurm/*.sbatch instead.)
set -euo pipefail
source "$(dirname "$0")/_ranks.sh"
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC <dskd subcommand> [args...]" >&2
  exit 2
fi
nproc=$1; shift
python=${PYTHON:-python3}
if ! "$python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # On CPU the launcher counts "devices" from LOCAL_SIZE; --num_gpus would ask Slurm-style GRES elsewhere.
  export DS_ACCELERATOR=cpu LOCAL_SIZE="$nproc" GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi
# The launcher's own default port is a fixed 29500, which two jobs on one node would share.
port=$(master_port "$python")
# --no_local_rank: dskd reads LOCAL_RANK from the environment, not from a --local_rank argument.
run_reporting "$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "$port" --no_local_rank \
  --module dskd "$@"
