"""The byte layouts of an int4 weight: plain rows of nibbles, and the blocked layouts PyTorch's CPU int4 kernel
(`_weight_int4pack_mm_for_cpu`) reads, which depend on the vector instructions it was dispatched for.

A weight (O, I) of values v = q + 8 in [0, 15] takes O * I / 2 bytes in every layout, held as a uint8 (O, I/2):

  "rows"              byte (o, j) = v[o, 2j] | v[o, 2j+1] << 4 (model/quantized.py's nibbles)
  "blocked64-halves"  rows in blocks of 64, the last block possibly shorter (a multiple of 16); a block of n rows
  "blocked32-halves"  starting at row r is stored contiguously, input column by input column, n/2 bytes per
  "blocked32-pairs"   column k:  halves: byte j = v[r+j, k] | v[r+j+n/2, k] << 4;
                                 pairs:  byte j = v[r+2j, k] | v[r+2j+1, k] << 4  (and every short last block)

The kernel packs AVX-512 weights in blocked64-halves, AVX2 in blocked32-halves and its scalar path in
blocked32-pairs (`kernel_layout` finds out by packing a probe). A checkpoint stores int4 in the layout of the
machine that wrote it, so that one loads it as a memory map; any other machine converts it (`relayout`). The CUDA
int4 kernel's layout is none of these: the bytes convert back to rows (`from_layout`) for any other packing.
"""

from __future__ import annotations

from functools import cache

import torch

LAYOUTS: dict[str, tuple[int, bool] | None] = {
    "rows": None, "blocked64-halves": (64, True), "blocked32-halves": (32, True), "blocked32-pairs": (32, False)}
"""Layout name -> (rows per block, whether a full block pairs its halves) or None for plain rows."""
CHUNK_ROWS = 4096
"""Rows converted at a time (a multiple of every block size): the unpacked copies stay small."""


def block_rows(layout: str) -> int:
    """Rows per block of `layout` (1 for plain rows): a matrix can be written in pieces of whole blocks."""
    spec = LAYOUTS[layout]
    return 1 if spec is None else spec[0]


def _values(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 (n, I/2) rows of nibbles -> uint8 (n, I) values in [0, 15]."""
    return torch.stack([nibbles & 0xF, nibbles >> 4], dim=-1).flatten(-2)


def _pack(values: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
    """uint8 (m * block, I) values -> the m blocks' bytes, flat."""
    v = values.reshape(-1, block, values.shape[-1])
    low, high = (v[:, :block // 2], v[:, block // 2:]) if halves else (v[:, 0::2], v[:, 1::2])
    return (low | (high << 4)).transpose(1, 2).reshape(-1)


def _unpack(data: torch.Tensor, block: int, halves: bool, columns: int) -> torch.Tensor:
    """Flat bytes of m blocks -> their uint8 (m * block, I) values."""
    t = data.reshape(-1, columns, block // 2).transpose(1, 2)
    low, high = t & 0xF, t >> 4
    v = torch.cat([low, high], dim=1) if halves else torch.stack([low, high], dim=2).flatten(1, 2)
    return v.reshape(-1, columns)


def to_layout(nibbles: torch.Tensor, layout: str) -> torch.Tensor:
    """uint8 (O, I/2) rows of nibbles of one matrix (or of whole blocks of it, from a block's first row) -> the same
    weight's bytes in `layout`, shaped (O, I/2)."""
    spec = LAYOUTS[layout]
    if spec is None:
        return nibbles.contiguous()
    block, halves = spec
    rows, half = nibbles.shape
    out = torch.empty((rows, half), dtype=torch.uint8)
    flat = out.view(-1)
    for start in range(0, rows, CHUNK_ROWS):
        values = _values(nibbles[start:start + CHUNK_ROWS])
        full = values.shape[0] // block * block
        packed = [_pack(values[:full], block, halves)] if full else []
        if full < values.shape[0]:
            packed.append(_pack(values[full:], values.shape[0] - full, False))
        flat[start * half:start * half + values.numel() // 2] = torch.cat(packed)
    return out


def from_layout(data: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of `to_layout`: uint8 (O, I/2) in `layout` -> rows of nibbles (O, I/2)."""
    spec = LAYOUTS[layout]
    if spec is None:
        return data.contiguous()
    block, halves = spec
    rows, half = data.shape
    flat, out = data.reshape(-1), torch.empty((rows, half), dtype=torch.uint8)
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        full = n // block * block
        chunk = flat[start * half:(start + n) * half]
        values = [_unpack(chunk[:full * half], block, halves, 2 * half)] if full else []
        if full < n:
            values.append(_unpack(chunk[full * half:], n - full, False, 2 * half))
        v = torch.cat(values)
        out[start:start + n] = v[:, 0::2] | (v[:, 1::2] << 4)
    return out


def relayout(data: torch.Tensor, source: str, target: str) -> torch.Tensor:
    """uint8 (..., O, I/2) int4 weights (a leading dimension stacks experts) from `source` to `target`, one matrix
    at a time into one new tensor; `data` itself where the layouts agree."""
    if source == target:
        return data
    if data.dim() > 2:
        out = torch.empty(data.shape, dtype=torch.uint8)
        for e in range(data.shape[0]):
            out[e] = relayout(data[e], source, target)
        return out
    return to_layout(from_layout(data, source), target)


@cache
def kernel_layout() -> str | None:
    """The layout `_convert_weight_to_int4pack_for_cpu` produces on this machine (None: none of `LAYOUTS`)."""
    probe = torch.randint(0, 16, (112, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    nibbles = (probe[:, 0::2] | (probe[:, 1::2] << 4)).to(torch.uint8)
    for name in LAYOUTS:
        if name != "rows" and packed.shape == nibbles.shape and torch.equal(to_layout(nibbles, name), packed):
            return name
    return None
