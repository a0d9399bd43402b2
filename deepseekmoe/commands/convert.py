"""`deepseekmoe convert`: HF import and export, weight-only quantization, and sharded checkpoints to and from
single-file ones, between directories."""

from __future__ import annotations

import sys
from pathlib import Path

from ..convert.hf import convert_from_hf
from ..convert.hf_export import convert_to_hf
from ..convert.quantize import check_format, convert_quantized
from ..errors import UserValueError
from ..train.sharded_checkpoint import sharded_to_single, single_to_sharded
from ..units import parse_bytes


def convert_command(*, from_hf: str | None = None, to_hf: str | None = None, from_checkpoint: str | None = None,
                    from_sharded: str | None = None, to_sharded: str | None = None, out: str,
                    quantize: str | None = None, group_size: int = 128, max_shard_size: str = "5GB",
                    overwrite: bool = False) -> int:
    """Convert between the Hugging Face DeepSeekMoE layout and this project's checkpoint directory.

    `--from-hf HF_DIR --out CHECKPOINT` imports a DeepseekForCausalLM directory (config.json, sharded safetensors
    with model.safetensors.index.json, tokenizer files), streaming shard by shard and keeping the dtype.
    `--to-hf CHECKPOINT --out HF_DIR` exports a checkpoint (or a run's latest) to that layout, sharded, with an
    index, a config.json whose auto_map names the model code written beside it (standalone: transformers loads the
    directory with trust_remote_code=True, without this package), tokenizer files with the chat template, and
    generation_config.json.
    `--quantize int8|int4` (with --from-hf, or --from-checkpoint CHECKPOINT) writes a weight-only quantized
    checkpoint instead, quantizing tensor by tensor as it streams (int8: a scale per output channel; int4: a scale
    per --group-size input columns); generate, eval and serve run it.
    `--from-sharded CHECKPOINT --out CHECKPOINT` turns a sharded checkpoint (`train --fsdp`; or a run's latest)
    into a single-file one, weights and AdamW state gathered to full size, so eval, generate, serve and --to-hf
    read it and, in a run's checkpoints/, `train --resume` continues from it; `--to-sharded CHECKPOINT --out DIR` goes back (both in one
    process, no torchrun).

    Args:
        from_hf: an HF directory to import.
        to_hf: a checkpoint or run directory to export.
        from_checkpoint: a float checkpoint or run directory to quantize (with --quantize).
        from_sharded: a sharded checkpoint (or a run directory whose latest checkpoint is one) to gather.
        to_sharded: a single-file checkpoint or run directory to write as a sharded checkpoint.
        quantize: int8 or int4: write a weight-only quantized checkpoint.
        group_size: input columns per int4 scale: 32, 64, 128 (default) or 256.
        out: the directory to write (written aside and renamed into place when complete).
        max_shard_size: largest safetensors shard when exporting, e.g. 5GB, 500MB, 2GiB.
        overwrite: replace --out if it already exists.
    """
    sources = (from_hf, to_hf, from_checkpoint, from_sharded, to_sharded)
    if sum(p is not None for p in sources) != 1:
        raise UserValueError("give exactly one of --from-hf HF_DIR, --to-hf CHECKPOINT, --from-checkpoint CHECKPOINT, "
                         "--from-sharded CHECKPOINT or --to-sharded CHECKPOINT")
    if (from_checkpoint is not None or to_hf is not None) and (quantize is None) == (to_hf is None):
        raise UserValueError("--from-checkpoint needs --quantize int8|int4; --to-hf exports float weights only")
    if quantize is not None and (from_sharded or to_sharded):
        raise UserValueError("--quantize takes --from-hf or --from-checkpoint; convert a sharded checkpoint with "
                         "--from-sharded first")
    src, dst = Path(next(p for p in sources if p is not None)), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"no such directory: {src}")
    if dst.resolve() == src.resolve():
        raise UserValueError(f"--out {dst} is the source directory; choose another path")
    if dst.resolve() in src.resolve().parents:
        raise UserValueError(f"--out {dst} contains the source {src}; replacing it would delete the source: "
                         "choose another path")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise UserValueError(f"--out {dst} already exists and is not empty (pass --overwrite to replace it)")
    if quantize is not None:
        convert_quantized(src, dst, check_format(quantize, group_size), group_size, progress=True)
    elif from_hf is not None:
        convert_from_hf(src, dst, progress=True)
    elif from_sharded is not None:
        sharded_to_single(src, dst)
    elif to_sharded is not None:
        single_to_sharded(src, dst)
    else:
        convert_to_hf(src, dst, int(parse_bytes(max_shard_size, "--max-shard-size")), progress=True)
    print(f"wrote {dst}", file=sys.stderr)
    return 0
