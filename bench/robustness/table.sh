#!/bin/bash
# docs/robustness.md: the students of this machine's results grid and their teachers, SST-2 and RTE.
cd "$(dirname "$0")/../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1
for task in sst2 rte; do
  len=64; [ $task = rte ] && len=128
  models="runs/results/$task/teacher"
  for m in no_teacher soft_kd internal_sid codir tinybert annealing_kd combined_kd glitter random kroneckerbert; do
    [ -f runs/results/$task/L3-$m-s1/metrics.json ] && models="$models runs/results/$task/L3-$m-s1"
  done
  python -m dskd robustness --models $models --config configs/results/soft_kd.yaml --set data.task=$task \
    --set data.max_length=$len --output runs/robustness/$task --max-examples 2000 --seed 0 \
    --attacks word char --attack-examples 100 --compare-to L3-soft_kd-s1 > runs/robustness/$task.log 2>&1
done
echo done
