"""An HF directory loaded as a model without a second copy of anything.

The model is built on the meta device and takes the read tensors as its parameters (nothing is allocated for it
first). On the CPU, every tensor that our layout keeps as HF stores it (embeddings, attention, norms, dense FFNs,
shared experts, router, LM head) is a view of the memory-mapped shard, read from disk as it is first used and
reclaimable like any file page; only the routed experts, which our layout stacks per layer (convert/hf.py), are
copied, each HF expert read from its file straight into its rows of the stacked tensor (plain reads: no page of it
is mapped into the process). Peak memory is the model: the stacked experts plus the mapped pages it reads.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..checkpoint import model_from_state, open_safetensors
from ..config import ModelConfig
from ..errors import UserValueError
from .hf import element_offset, is_tied_head, open_hf_dir, read_hf_state
from .hf_layout import our_source


def data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """{key: (first byte, end byte)} of every tensor of a safetensors file, as offsets into the file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _read_into(f, span: tuple[int, int], out: torch.Tensor) -> None:
    """The bytes span of the open file f, read into the contiguous tensor `out` (as many bytes)."""
    view = memoryview(out.view(torch.uint8).numpy())
    if span[1] - span[0] != view.nbytes:
        raise UserValueError(f"{f.name}: {span[1] - span[0]} bytes where {view.nbytes} were expected")
    f.seek(span[0])
    done = 0
    while done < view.nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise UserValueError(f"{f.name} ends inside a tensor")
        done += got


def read_hf_state_mapped(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF directory -> (config, our state dict on the CPU): views of the mapped shards where our layout is
    HF's, the stacked experts read into memory (module docstring); every key and shape checked first."""
    hf_dir = Path(hf_dir)
    config, files, layout, entries = open_hf_dir(hf_dir)
    state: dict[str, torch.Tensor] = {}
    for name, keys in files.items():
        spans = data_offsets(hf_dir / name)
        with open_safetensors(hf_dir / name) as mapped, open(hf_dir / name, "rb", buffering=0) as f:
            for key in keys:
                if is_tied_head(key, layout):
                    continue
                our_key, index = our_source(key)
                if not index:
                    state[our_key] = mapped.get_tensor(key)
                    continue
                if our_key not in state:
                    dtype, shape = entries[our_key]
                    state[our_key] = torch.empty(shape, dtype=dtype)
                numel = torch.Size(layout[key]).numel()
                start = element_offset(index, numel)
                _read_into(f, spans[key], state[our_key].view(-1)[start:start + numel])
    return config, state


def copied_bytes(hf_dir: str | Path) -> int:
    """Bytes `read_hf_state_mapped` holds outside the mapped files (the stacked routed experts), from config.json
    and the shard headers alone."""
    _, _, layout, entries = open_hf_dir(Path(hf_dir))
    stacked = {our_source(key)[0] for key in layout if our_source(key)[1]}
    return sum(torch.Size(shape).numel() * dtype.itemsize for k, (dtype, shape) in entries.items() if k in stacked)


def load_hf_model(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None):
    """An HF directory -> (Transformer in eval mode, the directory); the checkpoint's dtype unless `dtype`. The
    read tensors become the parameters; on the CPU they are used memory-mapped where our layout is HF's."""
    device = torch.device(device)
    config, state = read_hf_state_mapped(path) if device.type == "cpu" else read_hf_state(path, device)
    model = model_from_state(config, state, device)
    if dtype is not None:
        model.to(dtype)
    return model, Path(path)
