# Shared by the launchers (sourced, not run): start the ranks, pass signals on, and exit with
# the ranks' own code: 0, 2 (an input error, message already printed), 85 (checkpointed on a
# signal: requeue), else the failing rank's code.

# run_reporting CMD...: run a launcher (torchrun, mpirun, deepspeed) that starts the ranks.
# Rank 0 writes its exit code to $DSKD_EXIT_FILE and the ranks exit 0 on a clean stop, so
# the launcher prints no failure report for it (dskd/cli.py, run_and_exit).
run_reporting() {
  local file rc
  file=$(mktemp "${TMPDIR:-/tmp}/dskd-exit.XXXXXX")
  export DSKD_EXIT_FILE=$file
  set -m  # the launcher gets its own process group, so a signal reaches it and its ranks
  "$@" &
  local child=$!
  set +m
  trap 'kill -TERM -- -'"$child"' 2>/dev/null || true' TERM INT
  trap 'kill -USR1 -- -'"$child"' 2>/dev/null || true' USR1
  rc=0; wait "$child" || rc=$?
  while kill -0 -- -"$child" 2>/dev/null; do sleep 0.5; done  # ranks still checkpointing
  trap - TERM INT USR1
  if [ -s "$file" ] && { [ "$rc" -eq 0 ] || [ "$rc" -gt 128 ]; }; then rc=$(cat "$file"); fi
  rm -f "$file"
  report_exit "$rc"
}

# master_port PYTHON: $MASTER_PORT when given, else a port free on this node below the kernel's
# ephemeral range (dskd.runtime.launch.free_port), not a fixed default two jobs would share.
master_port() {
  if [ -n "${MASTER_PORT:-}" ]; then echo "$MASTER_PORT"; return; fi
  "$1" -c 'from dskd.runtime.launch import free_port; print(free_port())'
}

report_exit() {
  case "$1" in
    0|2) ;;
    85) echo "[launch] the ranks checkpointed on a signal; exit 85 (requeue, then continue with --auto-resume)" >&2 ;;
    *) echo "[launch] a rank failed with exit code $1" >&2 ;;
  esac
  return "$1"
}
