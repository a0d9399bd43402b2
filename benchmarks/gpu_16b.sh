#!/usr/bin/env bash
# DeepSeekMoE-16B in bf16 on one GPU: memory, prefill and decode tokens/s at batch 1, the HF loader straight to
# the device shard by shard, and the MoE layer benchmark at the 16B shapes. One JSON line per step.
#   bash benchmarks/gpu_16b.sh [SCRATCH_DIR]     (needs CUDA; about 5 GB of scratch disk)
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=${1:-/tmp/gpu16b}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# the full-size model, random bf16 weights built on the device: memory used, prefill and decode
python benchmarks/quant_16b.py run random --device cuda --prompt-len 512 --new-tokens 64
# the loading path: a 16B-shaped HF directory with 2 layers, read shard by shard straight to the GPU
rm -rf "$scratch" && python benchmarks/quant_16b.py make "$scratch/hf" --layers 2
python benchmarks/quant_16b.py run "$scratch/hf" --device cuda --prompt-len 512 --new-tokens 64
rm -rf "$scratch"
# the MoE block at the 16B shapes (grouped_mm in bf16 against the dense FFN and transformers)
python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --shapes 16b-decode-1,16b-decode-16,16b-2k --json
