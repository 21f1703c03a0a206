#!/usr/bin/env bash
# Commit the seeds grid's kept records (results/) together with docs/results.md's tables rewritten
# from exactly those records; the docs-table test fails when the two disagree.
#   bench/commit_records.sh ["commit message"]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
git add results
python bench/results.py --docs docs/results.md
# Records that a lane finished while the tables were made: add them too and make the tables again.
while [ -n "$(git ls-files --others --modified --exclude-standard results)" ]; do
  git add results
  python bench/results.py --docs docs/results.md
done
git add docs/results.md
git commit -qm "${1:-results/seeds: more kept records of the seeds grid; the table of docs/results.md rewritten from them}"
git log --oneline -1
