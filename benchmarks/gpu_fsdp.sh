#!/usr/bin/env bash
# FSDP2 + EP against DDP + EP on NCCL: one training step's time and memory per GPU at 1, 2, 4, ... GPUs (all the
# visible ones at most), each (dp, ep) layout, with and without per-block activation checkpointing; then the
# gloo tests of the same code. One JSON line per run (benchmarks/fsdp_step.py).
#   bash benchmarks/gpu_fsdp.sh [PRESET] [BATCH] [SEQ_LEN]     (defaults: small-deepseekmoe 16 1024; needs CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-small-deepseekmoe}; batch=${2:-16}; seq=${3:-1024}
gpus=$(python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.device_count())")
python -c "import torch; print(torch.cuda.get_device_name(), 'x', torch.cuda.device_count())"
run() { python -m torch.distributed.run --standalone --nproc-per-node "$1" benchmarks/fsdp_step.py \
          --preset "$preset" --batch "$batch" --seq-len "$seq" --json "${@:2}" | grep '^{'; }
run 1
for ((n = 2; n <= gpus; n *= 2)); do
  for ((ep = 1; ep <= n; ep *= 2)); do
    run "$n" --wrapper ddp --ep "$ep"
    run "$n" --wrapper fsdp --ep "$ep"
    run "$n" --wrapper fsdp --ep "$ep" --checkpoint-blocks
  done
done
# the planner's view of the largest layout, for comparison with the measured memory
python -m deepseekmoe plan --preset "$preset" --gpus "$gpus" --ep "$gpus" --micro-batch $((batch / gpus)) \
  --seq-len "$seq" --gpu-memory 80GB --fsdp --json
python -m pytest tests/test_fsdp.py -q -p no:warnings
