#!/usr/bin/env bash
# FSDP2 + EP against DDP + EP on NCCL: one training step's time and memory per GPU at 1, 2, 4, ... GPUs (all the
# visible ones at most), each (dp, ep) layout, with and without per-block activation checkpointing (one JSON line
# per run, benchmarks/fsdp_step.py); then `train --fsdp` itself on all GPUs (the built-in corpus), stopped after
# its step-20 checkpoint, resumed on one GPU and converted to a single-file checkpoint that `eval` reads; then the
# gloo tests of the same code.
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
# the trainer: train --fsdp on NCCL (bf16 compute), resumed at another world size, converted, evaluated
runs=$(mktemp -d)
python -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m deepseekmoe train --preset tiny-deepseekmoe \
  --fsdp --ep "$gpus" --max-steps 40 --out "$runs/fsdp" train.save_every=20 train.sample_tokens=0 | tail -3
cp -r "$runs/fsdp" "$runs/resumed" && rm -rf "$runs/resumed/checkpoints/step_00000040"
python -m deepseekmoe train --resume --out "$runs/resumed" | tail -2
python - "$runs" <<'PY'
import json, sys
def losses(run):
    return [r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{run}/metrics.jsonl")) if r["kind"] == "train"]
a, b = losses("fsdp"), losses("resumed")
print(json.dumps({"steps": len(a), "resumed_steps": len(b),
                  "max_rel_diff": max(abs(x - y) / abs(x) for x, y in zip(a, b))}))
PY
python -m deepseekmoe convert --from-sharded "$runs/fsdp" --out "$runs/single"
python -m deepseekmoe eval "$runs/single" --json --max-batches 4 --seq-len 256 \
  --data "$(python -c 'from deepseekmoe.data.builtin_cache import ensure_builtin_data; print(ensure_builtin_data())')"
rm -rf "$runs"
python -m pytest tests/test_fsdp.py tests/test_fsdp_train.py -q -p no:warnings
