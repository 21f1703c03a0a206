# Shared by the sbatch templates (sourced): run one dskd command as a job step, one task per
# GPU, and requeue the job when dskd checkpointed on a signal (exit code 85).
#   dskd_step distill --config C --output DIR --auto-resume
dskd_step() {
  # srun does not inherit --cpus-per-task from the batch allocation (Slurm 22.05 to 23.02): pass it
  # on, or with several tasks per node each task may be bound to one core while env.sh sets
  # OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK. dskd's [launch] line shows the CPUs a rank got.
  local cpus=()
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then cpus=(--cpus-per-task="${SLURM_CPUS_PER_TASK}"); fi
  # The batch shell gets SIGTERM too on preemption; keep it alive until srun has returned.
  trap 'echo "[slurm] SIGTERM: waiting for the tasks to checkpoint"' TERM
  echo "[slurm] job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task ${SLURM_ARRAY_TASK_ID})}," \
       "start $(( ${SLURM_RESTART_COUNT:-0} + 1 )), nodes ${SLURM_JOB_NODELIST}: dskd $*"
  srun --kill-on-bad-exit=1 "${cpus[@]}" python -m dskd "$@"
  local rc=$?
  if [ "$rc" -eq 85 ]; then
    echo "[slurm] the run checkpointed on a signal; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    return 0
  fi
  return "$rc"
}
