#!/usr/bin/env bash
# Pause the seeds grid for a measurement that needs the whole machine, then continue it.
#   bench/pause_grid.sh STOP   stop the lanes' processes, noting when
#   bench/pause_grid.sh CONT   continue them and add the pause to the wall.json of every run that was
#                              running, so its recorded wall time stays the time it computed
set -euo pipefail
cd "$(dirname "$0")/.."
pids=$(pgrep -f "seeds_grid.sh|bench/results.py|bench/general.py|python -m dskd" || true)
[ -n "$pids" ] || { echo "no grid process is running" >&2; exit 1; }
case "${1:-}" in
  STOP) date +%s > runs/paused-at
        kill -STOP $pids
        echo "stopped: $(echo $pids | wc -w) processes" ;;
  CONT) kill -CONT $pids
        [ -f runs/paused-at ] || { echo "runs/paused-at is missing: continued, wall times not corrected" >&2; exit 1; }
        secs=$(( $(date +%s) - $(cat runs/paused-at) ))
        rm runs/paused-at
        for out in $(ps -o args= -p "$(pgrep -d, -f "python -m dskd distill" || echo 0)" 2>/dev/null \
                     | sed -n 's/.*--output \([^ ]*\).*/\1/p'); do
          python3 - "$out" "$secs" <<'PY'
import json, sys
from pathlib import Path
wall = Path(sys.argv[1]) / "wall.json"
data = json.loads(wall.read_text()) if wall.is_file() else {"seconds": []}
data["paused_seconds"] = data.get("paused_seconds", 0) + int(sys.argv[2])
wall.write_text(json.dumps(data))
print(f"{wall}: paused_seconds += {sys.argv[2]}")
PY
        done ;;
  *) echo "usage: bench/pause_grid.sh STOP|CONT" >&2; exit 2 ;;
esac
