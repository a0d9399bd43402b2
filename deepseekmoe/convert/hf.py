"""Hugging Face checkpoint import: an HF DeepSeekMoE directory (the layout: hf_layout.py) -> our checkpoint.

Import first checks every key, shape and dtype from config.json, the index and the shard headers (no tensor
data read), so a bad checkpoint fails before any output exists. Then it streams shard by shard, tensor by tensor
(safetensors `safe_open`): each HF tensor is one contiguous block of one of our tensors (an expert's gate rows,
up rows or down matrix inside the stacked tensor), so it is written straight to its byte range of the output
file (`stream.SafetensorsWriter`) and experts that span shards need no buffering: peak memory is one shard's
pages plus one tensor, whatever the model size. Dtypes are kept (bf16 stays bf16). Reading into memory
(`read_hf_state`) fills preallocated tensors the same way; `hf_load.load_hf_model` on the CPU uses the shards
memory-mapped instead and copies only the stacked experts. Export, the way back, lives in `hf_export.py`; both take
every name and shape from `hf_layout.py`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from ..checkpoint import open_safetensors
from ..config import ModelConfig
from ..errors import UserValueError
from ..fileio import written_atomically
from ..filenames import CONFIG_FILE, MODEL_FILE
from .hf_layout import (INDEX_FILE, Shape, copy_side_files, format_shape, hf_layout, is_hf_directory, our_entries,
                        our_source)
from .stream import DTYPES, SafetensorsWriter


def read_hf_config(hf_dir: Path) -> ModelConfig:
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no {CONFIG_FILE}")
    try:
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))
    except ValueError as exc:
        raise UserValueError(f"{path}: {exc}") from None


def _inside(name: object) -> bool:
    """A relative path that stays inside its directory (no absolute path, no climbing out with '..')."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    parts = Path(os.path.normpath(name)).parts
    return bool(parts) and parts[0] != ".."


def weight_files(hf_dir: Path) -> dict[str, list[str]]:
    """{shard file name: [keys]} from the index (or the single model.safetensors), in file order."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserValueError(f"{index}: no weight_map")
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        for name in files:
            if not _inside(name):  # judged on the name alone: hub caches link shards to blobs elsewhere
                raise UserValueError(f"{index} names the shard {name!r}, which is not a file inside {hf_dir}")
            if not (hf_dir / name).is_file():
                raise FileNotFoundError(f"{index} names {name}, which does not exist")
        return dict(sorted(files.items()))
    single = hf_dir / MODEL_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{hf_dir}: neither {INDEX_FILE} nor {MODEL_FILE}")
    with open_safetensors(str(single)) as f:
        return {MODEL_FILE: list(f.keys())}


# ------------------------------------------------------------------------------------------------------ import
def _check_keys(hf_dir: Path, files: dict[str, list[str]], layout: dict[str, Shape]) -> None:
    """One error line for the first missing or unexpected tensor, with the shapes involved."""
    present = {k: name for name, keys in files.items() for k in keys}
    missing = [k for k in layout if k not in present]
    if missing:
        raise UserValueError(f"{hf_dir}: missing tensor {missing[0]} (expected shape "
                             f"{format_shape(layout[missing[0]])} from "
                         f"config.json; {len(missing)} missing in all)")
    unexpected = [k for k in present if k not in layout and not is_tied_head(k, layout)]
    if unexpected:
        key, name = unexpected[0], present[unexpected[0]]
        with open_safetensors(str(hf_dir / name)) as f:
            shape = f.get_slice(key).get_shape() if key in f.keys() else "?"
        raise UserValueError(f"{hf_dir / name}: unexpected tensor {key} with shape {format_shape(shape)} (not "
                             f"in the model "
                         f"config.json describes; {len(unexpected)} unexpected in all)")


def is_tied_head(key: str, layout: dict[str, Shape]) -> bool:
    """A tied LM head may still be stored; it is the embedding, so it is skipped."""
    return key == "lm_head.weight" and "lm_head.weight" not in layout


def _scan(hf_dir: Path, files: dict[str, list[str]], layout: dict[str, Shape]) -> dict[str, torch.dtype]:
    """Check every stored tensor against the layout from the shard headers alone -> {HF key: dtype}."""
    dtypes: dict[str, torch.dtype] = {}
    for name, keys in files.items():
        with open_safetensors(str(hf_dir / name)) as f:
            stored = set(f.keys())
            for key in keys:
                if is_tied_head(key, layout):
                    continue
                if key not in stored:
                    raise UserValueError(f"{hf_dir / INDEX_FILE} places {key} in {name}, which does not contain it")
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                if shape != layout[key]:
                    raise UserValueError(f"{hf_dir / name}: tensor {key} has shape {format_shape(shape)}, expected "
                                     f"{format_shape(layout[key])} from config.json")
                dtypes[key] = DTYPES[piece.get_dtype()]
    return dtypes


def element_offset(index: tuple, numel: int) -> int:
    """Where one HF tensor of `numel` elements starts inside our (flattened) tensor: experts are stacked, and
    within gate_up_proj each expert's gate rows come before its up rows."""
    if not index:
        return 0
    expert, part = index
    return expert * numel if part is None else (2 * expert + part) * numel


def stream_hf_pieces(hf_dir: Path, files: dict[str, list[str]], layout: dict[str, Shape],
                     device: str | torch.device, progress: bool) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(our key, element offset, tensor) for every HF tensor, one shard open at a time."""
    for n, (name, keys) in enumerate(files.items(), 1):
        if progress:
            print(f"reading {name} ({n}/{len(files)}, {len(keys)} tensors)", file=sys.stderr, flush=True)
        with open_safetensors(str(hf_dir / name), str(device)) as f:
            for key in keys:
                if not is_tied_head(key, layout):
                    t = f.get_tensor(key)
                    our_key, index = our_source(key)
                    yield our_key, element_offset(index, t.numel()), t


def open_hf_dir(hf_dir: Path) -> tuple[ModelConfig, dict[str, list[str]], dict[str, Shape], dict]:
    """Read config.json and the shard headers; every check that needs no tensor data happens here."""
    if not is_hf_directory(hf_dir):
        raise UserValueError(f"{hf_dir} is not a Hugging Face DeepSeekMoE directory (config.json with model_type "
                         f"'deepseek' beside HF-keyed safetensors weights)")
    config = read_hf_config(hf_dir)
    layout = hf_layout(config)
    files = weight_files(hf_dir)
    _check_keys(hf_dir, files, layout)
    return config, files, layout, our_entries(config, _scan(hf_dir, files, layout))


def read_hf_state(hf_dir: str | Path, device: str | torch.device = "cpu",
                  progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF directory -> (config, our state dict), checking every key and shape before reading any data."""
    hf_dir = Path(hf_dir)
    config, files, layout, entries = open_hf_dir(hf_dir)
    state = {k: torch.empty(shape, dtype=dtype, device=device) for k, (dtype, shape) in entries.items()}
    for our_key, start, t in stream_hf_pieces(hf_dir, files, layout, device, progress):
        state[our_key].view(-1)[start:start + t.numel()] = t.reshape(-1)
    return config, state


def convert_from_hf(hf_dir: str | Path, out: str | Path, progress: bool = False) -> Path:
    """HF directory -> our checkpoint directory (model.safetensors, config.json, tokenizer files), atomically.

    Each HF tensor is written straight to its place in the output file: peak memory is one tensor."""
    hf_dir, out = Path(hf_dir), Path(out)
    config, files, layout, entries = open_hf_dir(hf_dir)
    with written_atomically(out) as tmp:
        with SafetensorsWriter(tmp / MODEL_FILE, entries) as writer:
            for our_key, start, t in stream_hf_pieces(hf_dir, files, layout, "cpu", progress):
                writer.write(our_key, t, start)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        copy_side_files(hf_dir, tmp)
    return out
