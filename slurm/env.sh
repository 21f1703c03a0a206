# The one place for a site's environment, sourced by every template in slurm/ on every
# (re)start of a job. Edit it, or point DSKD_ENV at your own copy: sbatch --export=ALL,DSKD_ENV=/path/env.sh
#   module load cuda/12.4 nccl        # your cluster's modules
#   source /path/to/venv/bin/activate # the environment where `pip install -e .` ran
# NCCL on clusters: the interface and, with InfiniBand, the HCA (see docs/slurm.md)
#   export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5
if [ -n "${DSKD_VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$DSKD_VENV/bin/activate"
fi
# One OpenMP thread pool per task of the size Slurm gave it.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}"
