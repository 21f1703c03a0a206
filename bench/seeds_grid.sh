#!/usr/bin/env bash
# The seeds grid of docs/results.md ("Seeds, intervals and paired tests") in lanes of one thread
# each, split by measured run time:
#   S: SST-2's core rows (seeds 1-3), then three SST-2 rows with random batches (results/random),
#      then the stronger SST-2 teacher's rows;
#   M: MRPC's core rows (seeds 1-3), then the two-stage rows (bench/general.py) on MRPC and SST-2;
#   T: the two-stage rows from the other end (rows and tasks reversed), for a core lane S leaves free.
#      Where lanes meet, a run one lane is writing is left to it (its live lock; bench/results_grid.busy).
# Start S and M side by side once each task's teacher is fine-tuned (or let one lane fine-tune it
# first), and T when S has ended (two cores: two lanes at a time):
#   for L in S M; do nohup bench/seeds_grid.sh $L >> runs/logs/seeds-$L.log 2>&1 & done
# Every run resumes where it stopped; each finished run's record goes to results/seeds (committed),
# so a new checkout runs only what is not kept there (bench/results.py --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
G=(--root runs/seeds --keep results/seeds --layers 3 --threads 1 --set training.group_by_length=true)
CORE=(no_teacher soft_kd internal_all internal_pid internal_sid codir tinybert minilm annealing_kd combined_kd glitter)
TWO=(--root runs/seeds --keep results/seeds --seeds 1 2 3 --threads 1 --set training.group_by_length=true)
core() { python bench/results.py "${G[@]}" --tasks "$1" --seeds "$2" --methods "${CORE[@]}"; }
case "${1:-}" in
  S) for seed in 1 2 3; do core sst2 "$seed"; done
     # random batches against grouped ones (--compare-root results/random): does grouping move the dev metric?
     # Same teacher and cache as the grid (links, so neither is made twice).
     mkdir -p runs/random/sst2 runs/seeds/sst2/teacher runs/seeds/sst2/teacher-cache
     for d in teacher teacher-cache; do ln -sfn "../../seeds/sst2/$d" "runs/random/sst2/$d"; done
     python bench/results.py --root runs/random --keep results/random --layers 3 --threads 1 --tasks sst2 \
       --seeds 1 2 3 --methods no_teacher soft_kd internal_all
     python bench/results.py "${G[@]}" --tasks sst2 --seeds 1 2 3 --methods soft_kd@full soft_kd@full+unlabeled ;;
  M) for seed in 1 2 3; do core mrpc "$seed"; done
     python bench/general.py "${TWO[@]}" --tasks mrpc sst2 \
       --rows general_init codir_general kronecker_general kronecker_single pretrained_copy ;;
  T) python bench/general.py "${TWO[@]}" --tasks sst2 mrpc \
       --rows pretrained_copy kronecker_single kronecker_general codir_general general_init ;;
  *) echo "usage: bench/seeds_grid.sh S|M|T  (the lane: S = SST-2 core rows, random batches, the stronger teacher; M = MRPC core rows, then the two-stage rows; T = the two-stage rows from the other end)" >&2
     exit 2 ;;
esac
