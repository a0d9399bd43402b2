"""Export: our checkpoint -> the Hugging Face DeepSeekMoE layout (sharded safetensors + index; config.json, remote
code, tokenizer and generation files from `hf_files.py`). Key names and shapes come from `hf_layout.py`; this file only
cuts and writes.

Shards are planned from the stored shapes and dtypes before anything is read, so files get their final
`model-0000k-of-0000n` names at once; each tensor is then read (single experts out of the stacked tensors with
safetensors `get_slice`) and written straight into its shard, so peak memory is one tensor.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..checkpoint import open_safetensors
from ..config import ModelConfig
from ..errors import UserValueError
from ..fileio import written_atomically
from ..filenames import CONFIG_FILE, MODEL_FILE
from ..units import parse_bytes
from .hf_files import write_hf_files
from .hf_layout import (INDEX_FILE, Shape, copy_side_files, format_shape, hf_layout, is_hf_directory, our_entries,
                        our_source)
from .load import resolve_checkpoint
from .stream import DTYPES, SafetensorsWriter


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy in key order: a new shard starts when the next tensor would push the current one past max_bytes."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, nbytes in sizes:
        if current and current_bytes + nbytes > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def _read_hf_tensor(f, hf_key: str, config: ModelConfig) -> torch.Tensor:
    our_key, index = our_source(hf_key)
    if not index:
        return f.get_tensor(our_key)
    expert, part = index
    if part is None:
        return f.get_slice(our_key)[expert]
    rows = config.moe_intermediate_size
    return f.get_slice(our_key)[expert, part * rows:(part + 1) * rows]


def _check_our_checkpoint(path: Path, f, config: ModelConfig, layout: dict[str, Shape]) -> dict[str, torch.dtype]:
    """Our file must hold exactly the tensors the HF layout is cut from, with matching shapes -> {HF key: dtype}."""
    expected = {k: shape for k, (_, shape) in our_entries(config, dict.fromkeys(layout, torch.float32)).items()}
    stored = set(f.keys())
    for key, shape in expected.items():
        if key not in stored:
            raise UserValueError(f"{path}: missing tensor {key} (expected shape {format_shape(shape)} from "
                                 f"config.json)")
        found = tuple(f.get_slice(key).get_shape())
        if found != shape:
            raise UserValueError(f"{path}: tensor {key} has shape {format_shape(found)}, expected "
                                 f"{format_shape(shape)} from config.json")
    extra = sorted(stored - set(expected))
    if extra:
        raise UserValueError(f"{path}: unexpected tensor {extra[0]} with shape "
                         f"{format_shape(f.get_slice(extra[0]).get_shape())} (not in the model config.json describes)")
    return {k: DTYPES[f.get_slice(our_source(k)[0]).get_dtype()] for k in layout}


def _write_shards(source: Path, config: ModelConfig, layout: dict[str, Shape], dtypes: dict[str, torch.dtype],
                  out: Path, max_bytes: int, progress: bool) -> None:
    """Cut the layout into shards and write them one tensor at a time, reading each from our file as written.
    The source is reopened per shard, so the pages it maps are released shard by shard."""
    sizes = [(k, math.prod(shape) * dtypes[k].itemsize) for k, shape in layout.items()]
    shards = plan_shards(sizes, max_bytes)
    names = ([MODEL_FILE] if len(shards) == 1
             else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map = {}
    for name, keys in zip(names, shards):
        if progress:
            print(f"writing {name} ({len(keys)} tensors)", file=sys.stderr, flush=True)
        entries = {k: (dtypes[k], layout[k]) for k in keys}
        with open_safetensors(str(source)) as f, \
                SafetensorsWriter(out / name, entries, metadata={"format": "pt"}) as writer:
            for k in keys:
                writer.write(k, _read_hf_tensor(f, k, config))
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def convert_to_hf(checkpoint: str | Path, out: str | Path, max_shard_size: str | int = "5GB",
                  progress: bool = False) -> Path:
    """Our checkpoint (or a run's latest) -> an HF directory in the official layout, atomically."""
    ckpt, out = resolve_checkpoint(checkpoint), Path(out)
    if is_hf_directory(ckpt):
        raise UserValueError(f"{ckpt} is already a Hugging Face directory; --to-hf takes one of our checkpoints")
    max_bytes = int(parse_bytes(max_shard_size, "max_shard_size"))
    config = ModelConfig.from_dict(json.loads((ckpt / CONFIG_FILE).read_text()))
    layout = hf_layout(config)
    with written_atomically(out) as tmp:
        with open_safetensors(str(ckpt / MODEL_FILE)) as f:
            dtypes = _check_our_checkpoint(ckpt / MODEL_FILE, f, config, layout)
        _write_shards(ckpt / MODEL_FILE, config, layout, dtypes, tmp, max_bytes, progress)
        copy_side_files(ckpt, tmp)
        write_hf_files(config, dtypes["model.embed_tokens.weight"], tmp)
    return out


