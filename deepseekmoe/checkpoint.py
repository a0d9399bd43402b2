"""Checkpoints on disk. A checkpoint is a directory:

    model.safetensors   Transformer.state_dict() (a tied LM head is stored once, as embed_tokens.weight)
    config.json         ModelConfig.to_dict()
    tokenizer.json      the run's tokenizer, when it has one

A run directory keeps checkpoints under RUN_DIR/checkpoints/step_XXXXXXXX/; `find_checkpoint` accepts either.
`train --fsdp` writes sharded checkpoints there instead (train/sharded_checkpoint.py: dcp/ in place of
model.safetensors); the run's checkpoint list holds both kinds, and the commands that read weights ask for a
conversion (`convert --from-sharded`) in one line.
This module knows only this format; `convert/load.py` loads any checkpoint path, ours or Hugging Face's.
Directories are written with `fileio.written_atomically`: a kill or a power loss leaves the old directory or the
new one, complete.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import UserValueError
from .fileio import written_atomically
from .filenames import CONFIG_FILE, MODEL_FILE, SHARDED_DIR, SHARDED_METADATA_FILE, STEP_PREFIX, TOKENIZER_FILE
from .model import Transformer
from .model.init import assign_weights, reset_tables



@contextmanager
def open_safetensors(path: str | Path, device: str = "cpu") -> Iterator:
    """safe_open(path), with a damaged file (truncated, garbage) reported as one ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            yield f
    except SafetensorError as exc:
        raise _unreadable(path, exc) from None


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (see open_safetensors)."""
    try:
        return load_file(str(path), device=device)
    except SafetensorError as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: str | Path, exc: Exception) -> UserValueError:
    return UserValueError(f"{path} is not a readable safetensors file ({exc}); it may be truncated")


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_model_files(model: Transformer, directory: Path, tokenizer_path: str | Path | None = None) -> None:
    """Write model.safetensors, config.json (and tokenizer.json) into an existing directory."""
    save_file(model_state(model), str(directory / MODEL_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, directory / TOKENIZER_FILE)


def save_model(model: Transformer, directory: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Atomically write a loadable checkpoint directory."""
    final = Path(directory)
    with written_atomically(final) as tmp:
        write_model_files(model, tmp, tokenizer_path)
    return final


def is_sharded(path: str | Path) -> bool:
    """A sharded checkpoint directory (train/sharded_checkpoint.py), complete."""
    return (Path(path) / SHARDED_DIR / SHARDED_METADATA_FILE).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (single-file or sharded), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and ".tmp-" not in p.name
             and not p.name.endswith(".old") and ((p / MODEL_FILE).is_file() or is_sharded(p))]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: str | Path, sharded: bool = False) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory (`convert.load` adds HF directories).
    A sharded one is an error naming the conversion command unless `sharded` allows it."""
    p = Path(path)
    found = p if (p / MODEL_FILE).is_file() or is_sharded(p) else (list_checkpoints(p) or [None])[-1]
    if found is None:
        if not p.exists():
            raise FileNotFoundError(f"no such checkpoint or run directory: {p}")
        raise FileNotFoundError(f"{p} holds no checkpoint ({MODEL_FILE} or checkpoints/{STEP_PREFIX}*)")
    if is_sharded(found) and not sharded:
        raise UserValueError(f"{found} is a sharded checkpoint (train --fsdp); convert it first: deepseekmoe convert "
                         f"--from-sharded {found} --out CHECKPOINT")
    return found


def _check_state(state: dict[str, torch.Tensor], config: ModelConfig, ckpt: Path) -> None:
    """The tensors are those config.json implies, each of its shape; else one error naming the file."""
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    if config.tie_word_embeddings and "embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserValueError(f"{ckpt / MODEL_FILE}: {key} has shape {list(tensor.shape)}, but {ckpt / CONFIG_FILE} "
                             f"implies {list(expected[key].shape)}")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise UserValueError(f"{ckpt / MODEL_FILE}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], device: torch.device | str) -> Transformer:
    """A Transformer in eval mode whose parameters are the tensors of `state` (assigned, never copied), with its
    fixed tables (rotary, hash routing) built on `device`."""
    with torch.device("meta"):
        model = Transformer(config)
    assign_weights(model, state)
    reset_tables(model, device)
    return model.eval()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[Transformer, Path]:
    """Load a checkpoint (or a run's latest) -> (model in eval mode, checkpoint directory), in `dtype` (default:
    torch's default dtype). The read tensors become the parameters: on the CPU they stay memory-mapped views of
    model.safetensors (copy-on-write: pages are read as first used, and training writes private copies), so
    loading needs no second copy of the weights."""
    ckpt = find_checkpoint(path)
    config = ModelConfig.from_dict(json.loads((ckpt / CONFIG_FILE).read_text()))
    state = read_safetensors(ckpt / MODEL_FILE, device=str(device))
    _check_state(state, config, ckpt)
    model = model_from_state(config, state, device)
    return model.to(dtype or torch.get_default_dtype()), ckpt
