#!/bin/bash
# docs/monitoring.md: two learning rates and one diverging run, logs redirected as sbatch does.
cd "$(dirname "$0")/../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1
rm -rf runs/tbdemo/sweep
for lr in 1.0e-4 3.0e-4 1e30; do
  nice python -m dskd distill --config configs/examples/monitoring_demo.yaml --output runs/tbdemo/sweep/lr$lr \
    --set training.lr=$lr > runs/tbdemo/lr$lr.log 2>&1
done
echo done > runs/tbdemo/DONE3
