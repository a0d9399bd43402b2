"""Weight-only int8 / int4 checkpoints: which tensors are quantized, their layout, and streamed quantization.

A quantized checkpoint is an ordinary checkpoint directory (checkpoint.py) whose model.safetensors holds,
for every quantized tensor NAME, the quantized data NAME (int8 (..., O, I), or int4 as uint8 (..., O, I/2)) and its
float32 scales NAME_scale ((..., O), or (..., O, I/G)), in the formats of model/quantized.py; every other tensor
keeps its dtype. config.json carries, beside the model fields,

    "quantization": {"format": "int8" | "int4", "group_size": null | G, "scale_dtype": "float32",
                     "int4_layout": null | "rows" | "blocked64-halves" | ...}

int4 bytes are in the layout of the CPU int4 kernel of the machine that wrote them (model/int4_layout.py; "rows",
plain nibbles, where that kernel's layout is unknown, and in checkpoints without the field), so that a machine
with the same kernel uses them straight from the memory-mapped file; another converts them while loading.

Quantized: every weight matrix of the attention projections, dense FFNs, shared experts, routed experts (stacked
per layer) and the LM head. Kept in float: the embeddings, the router (`mlp.gate.weight`), the norms, and an LM head
tied to the embeddings (stored once, as the embedding).

An int4 checkpoint stores in int8 the few tensors the int4 kernel cannot take (an output size not a multiple of 16,
or no group size in 32-256 dividing the input size: the 16B's dense down_proj, 10944 wide, gets groups of 64 where
128 is asked); each tensor's format is its dtype and its group size follows from the shapes.

Quantization is per output row (int8) or per row and group of columns (int4), so every piece of a tensor that the
converters stream (a whole tensor, or one HF expert's rows inside a stacked expert tensor) is quantized on its own
and written at its rows: peak memory is one float tensor, whatever the model size. Tensors are laid out largest
element first (float32 scales, then the float tensors, then the quantized data), so each starts aligned to its
element size and can be used straight from the memory-mapped file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..config import ModelConfig
from ..errors import UserValueError
from ..model.int4_layout import LAYOUTS, block_rows, kernel_layout, to_layout
from ..model.quantized import FORMATS, GROUP_SIZES, SCALE_SUFFIX, Format, int4_group_size, quantize
from ..checkpoint import CONFIG_FILE, MODEL_FILE, open_safetensors

Entries = dict[str, tuple[torch.dtype, tuple[int, ...]]]
KEPT_IN_FLOAT = ("embed_tokens.weight", "mlp.gate.weight")
BLOCK_ELEMENTS = 1 << 22
"""Rows are quantized in blocks of about this many elements (the LM head would take 3 float32 copies of 0.8 GB)."""


class Sink(Protocol):
    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None: ...


def check_format(fmt: str, group_size: int) -> Format:
    if fmt not in FORMATS:
        raise UserValueError(f"--quantize {fmt!r} is not a format: expected one of {', '.join(FORMATS)}")
    if fmt == "int4" and group_size not in GROUP_SIZES:
        raise UserValueError(f"--group-size {group_size} is not supported by the int4 kernel: use one of "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    return fmt  # type: ignore[return-value]


def is_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the float tensor `name` of our checkpoint is stored quantized (module docstring)."""
    return len(shape) >= 2 and not name.endswith(KEPT_IN_FLOAT)


def tensor_format(shape: tuple[int, ...], fmt: Format, group_size: int) -> tuple[Format, int | None]:
    """(format, group size) one quantized tensor gets: an int4 checkpoint keeps in int8 what its kernel cannot
    take (model.quantized.int4_group_size)."""
    group = int4_group_size(shape, group_size) if fmt == "int4" else None
    return ("int4", group) if group else ("int8", None)


def quantized_entries(entries: Entries, fmt: Format, group_size: int) -> Entries:
    """Our float layout {name: (dtype, shape)} -> the quantized checkpoint's layout, largest element first."""
    out: Entries = {}
    for name, (dtype, shape) in entries.items():
        if not is_quantized(name, shape):
            out[name] = (dtype, shape)
            continue
        *lead, o, i = shape
        kind, group = tensor_format(shape, fmt, group_size)
        if kind == "int8":
            out[name], out[name + SCALE_SUFFIX] = (torch.int8, shape), (torch.float32, (*lead, o))
        else:
            out[name], out[name + SCALE_SUFFIX] = (torch.uint8, (*lead, o, i // 2)), \
                (torch.float32, (*lead, o, i // group))
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0].itemsize))


def quantization_entry(fmt: Format, group_size: int, layout: str = "rows") -> dict:
    """The `quantization` entry of a quantized checkpoint's config.json (`layout`: of its int4 bytes)."""
    int4 = fmt == "int4"
    return {"format": fmt, "group_size": group_size if int4 else None, "scale_dtype": "float32",
            "int4_layout": layout if int4 else None}


def stored_layout(quantization: dict, where: Path) -> str:
    """The int4 layout a `quantization` entry names ("rows" where it names none)."""
    layout = quantization.get("int4_layout") or "rows"
    if layout not in LAYOUTS:
        raise UserValueError(f"{where}: quantization.int4_layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    return layout


class QuantizingWriter:
    """Takes float pieces of our tensors (name, tensor, element offset into the float tensor) and writes them to
    `sink` in the quantized layout: quantized rows and their scales where `is_quantized`, as they are otherwise;
    int4 bytes in `layout`, whole blocks at a time (the rows of a block that a piece leaves incomplete wait for
    the piece that completes it; `close` checks that none still waits)."""

    def __init__(self, sink: Sink, entries: Entries, fmt: Format, group_size: int, layout: str = "rows") -> None:
        self.sink, self.entries, self.fmt, self.group_size = sink, entries, fmt, group_size
        self.layout, self.block = layout, block_rows(layout)
        self.waiting: dict[tuple[str, int], tuple[torch.Tensor, int]] = {}

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        shape = self.entries[name][1]
        if not is_quantized(name, shape):
            self.sink.write(name, tensor, start)
            return
        columns = shape[-1]
        kind, group = tensor_format(shape, self.fmt, self.group_size)
        rows = tensor.reshape(-1, columns)
        step = max(1, BLOCK_ELEMENTS // columns)
        for first in range(0, rows.shape[0], step):  # a block of rows at a time: its float32 copies stay small
            q, s = quantize(rows[first:first + step], kind, group or 0)
            row = start // columns + first
            if kind == "int4":
                self._int4_rows(name, q, row, shape[-2])
            else:
                self.sink.write(name, q, row * q.shape[-1])
            self.sink.write(name + SCALE_SUFFIX, s, row * (s.numel() // q.shape[0]))

    def _int4_rows(self, name: str, q: torch.Tensor, row: int, matrix_rows: int) -> None:
        """Nibble rows q starting at flat row `row` of a tensor of matrices of `matrix_rows` rows: the whole
        blocks written in the layout, the rest kept until their blocks are complete."""
        while q.shape[0]:
            base, local = row - row % matrix_rows, row % matrix_rows
            n = min(q.shape[0], matrix_rows - local)
            end = local + n
            first = -(-local // self.block) * self.block
            last = end if end == matrix_rows else end // self.block * self.block
            self._wait(name, q[:min(first, end) - local], base, local, matrix_rows)
            if first < last:
                self.sink.write(name, to_layout(q[first - local:last - local], self.layout),
                                (base + first) * q.shape[1])
            tail = max(first, last)
            self._wait(name, q[tail - local:n], base, tail, matrix_rows)
            q, row = q[n:], row + n

    def _wait(self, name: str, q: torch.Tensor, base: int, local: int, matrix_rows: int) -> None:
        """Rows [local, local + len(q)) of the matrix at flat row `base`, inside one block: kept; the block is
        written once all its rows are there."""
        if not q.shape[0]:
            return
        start = local // self.block * self.block
        key = (name, base + start)
        rows = min(self.block, matrix_rows - start)
        buffer, have = self.waiting.pop(key, (torch.empty((rows, q.shape[1]), dtype=torch.uint8), 0))
        buffer[local - start:local - start + q.shape[0]] = q
        if have + q.shape[0] < rows:
            self.waiting[key] = (buffer, have + q.shape[0])
        else:
            self.sink.write(name, to_layout(buffer, self.layout), (base + start) * q.shape[1])

    def close(self) -> None:
        if self.waiting:
            raise RuntimeError(f"int4 blocks never completed: {sorted(self.waiting)[:4]}")


class MemorySink:
    """The tensors of a layout, allocated once and filled piece by piece (a quantized model loaded on the fly)."""

    def __init__(self, entries: Entries) -> None:
        self.state = {k: torch.empty(shape, dtype=dtype) for k, (dtype, shape) in entries.items()}

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        self.state[name].view(-1)[start:start + tensor.numel()] = tensor.reshape(-1)


# ------------------------------------------------------------------------------- our own float checkpoints
def checkpoint_entries(ckpt: Path) -> tuple[ModelConfig, Entries]:
    """(config, {name: (dtype, shape)}) of a float checkpoint, from config.json and the file header alone."""
    from .stream import DTYPES

    raw = json.loads((ckpt / CONFIG_FILE).read_text())
    if "quantization" in raw:
        raise UserValueError(f"{ckpt} is already quantized ({raw['quantization'].get('format')})")
    config = ModelConfig.from_dict(raw)
    with open_safetensors(ckpt / MODEL_FILE) as f:
        entries = {k: (DTYPES[f.get_slice(k).get_dtype()], tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    return config, entries


def stream_checkpoint(ckpt: Path) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(name, element offset, piece) for every tensor of a float checkpoint, a stacked expert tensor one expert at
    a time (the file is memory-mapped: each piece is read as it is used)."""
    with open_safetensors(ckpt / MODEL_FILE) as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dim() == 3:
                for e in range(t.shape[0]):
                    yield name, e * t[e].numel(), t[e]
            else:
                yield name, 0, t


# --------------------------------------------------------------------------------------------------- sources
def float_source(src: Path, progress: bool = False) -> tuple[ModelConfig, Entries, Iterator, Path]:
    """(config, float layout, its pieces (name, element offset, tensor), the directory holding the tokenizer files)
    of an HF directory or a float checkpoint (or a run's latest)."""
    from .hf import open_hf_dir, stream_hf_pieces
    from .hf_layout import is_hf_directory
    from .load import resolve_checkpoint

    if is_hf_directory(src):
        config, files, layout, entries = open_hf_dir(src)
        return config, entries, stream_hf_pieces(src, files, layout, "cpu", progress), src
    ckpt = resolve_checkpoint(src)
    config, entries = checkpoint_entries(ckpt)
    return config, entries, stream_checkpoint(ckpt), ckpt


def read_quantized_state(src: str | Path, fmt: Format, group_size: int = 128,
                         progress: bool = False) -> tuple[ModelConfig, dict, dict[str, torch.Tensor]]:
    """Quantize an HF directory or a float checkpoint into memory, piece by piece -> (config, the `quantization`
    entry, the quantized state in the on-disk layout)."""
    config, entries, pieces, _ = float_source(Path(src), progress)
    sink = MemorySink(quantized_entries(entries, fmt, group_size))
    layout = kernel_layout() or "rows"
    writer = QuantizingWriter(sink, entries, fmt, group_size, layout)
    for name, start, t in pieces:
        writer.write(name, t, start)
    writer.close()
    return config, quantization_entry(fmt, group_size, layout), sink.state


def convert_quantized(src: str | Path, out: str | Path, fmt: Format, group_size: int = 128,
                      progress: bool = False, int4_layout: str | None = None) -> Path:
    """An HF directory or a float checkpoint -> a quantized checkpoint directory, written piece by piece and
    atomically (module docstring); int4 bytes in `int4_layout` (default: this machine's kernel's)."""
    from ..fileio import written_atomically
    from .hf_layout import copy_side_files
    from .stream import SafetensorsWriter

    out = Path(out)
    config, entries, pieces, side = float_source(Path(src), progress)
    int4_layout = int4_layout or kernel_layout() or "rows"
    with written_atomically(out) as tmp:
        with SafetensorsWriter(tmp / MODEL_FILE, quantized_entries(entries, fmt, group_size)) as sink:
            writer = QuantizingWriter(sink, entries, fmt, group_size, int4_layout)
            for name, start, t in pieces:
                writer.write(name, t, start)
            writer.close()
        raw = {**config.to_dict(), "quantization": quantization_entry(fmt, group_size, int4_layout)}
        (tmp / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")
        copy_side_files(side, tmp)
    return out


def read_quantized_checkpoint(ckpt: Path) -> tuple[ModelConfig, dict, dict[str, torch.Tensor]] | None:
    """(config, `quantization` entry, state as memory-mapped views of model.safetensors) of a quantized
    checkpoint; None for a float one."""
    raw = json.loads((ckpt / CONFIG_FILE).read_text())
    quantization = raw.pop("quantization", None)
    if quantization is None:
        return None
    fmt = quantization.get("format") if isinstance(quantization, dict) else None
    if fmt not in FORMATS:
        raise UserValueError(f"{ckpt / CONFIG_FILE}: quantization.format={fmt!r} is not one of {', '.join(FORMATS)}")
    stored_layout(quantization, ckpt / CONFIG_FILE)
    config = ModelConfig.from_dict(raw)
    with open_safetensors(ckpt / MODEL_FILE) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    return config, quantization, state
