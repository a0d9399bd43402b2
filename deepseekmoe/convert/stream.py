"""A safetensors file written piece by piece, so converting a checkpoint never holds a whole model in memory.

`safetensors.torch.save_file` needs every tensor at once (and serialises each into a bytes copy). Here the
header is written first, from names, dtypes and shapes alone; then each piece is written at its byte offset, in
any order: a whole tensor, or a block of rows of one (one HF expert inside our stacked expert tensor). The
format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} padded with
spaces (to a multiple of 8, as the format asks; here so that the data starts at a multiple of 64 bytes), then the
data, tensors back to back in header order.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from ..errors import UserValueError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DATA_ALIGNMENT = 64
"""The header is padded so the data starts at a multiple of this: a tensor whose offset is one too can be used
straight from the memory-mapped file by kernels that need aligned rows (torch's CPU int8 weight matmul)."""


class SafetensorsWriter:
    """`with SafetensorsWriter(path, {name: (dtype, shape)}) as w: w.write(name, tensor, start=element_offset)`."""

    def __init__(self, path: str | Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict = {"__metadata__": metadata} if metadata else {}
        self._offsets: dict[str, tuple[int, torch.dtype, int]] = {}  # name -> (data offset, dtype, numel)
        offset = 0
        for name, (dtype, shape) in entries.items():
            numel = math.prod(shape)
            nbytes = numel * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._offsets[name] = (offset, dtype, numel)
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % DATA_ALIGNMENT)
        self._data_start = 8 + len(text)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write `tensor` (flattened) into tensor `name` from element `start` on; the dtype must match."""
        offset, dtype, numel = self._offsets[name]
        if tensor.dtype != dtype:
            raise UserValueError(f"{name}: writing {tensor.dtype} data into a {dtype} tensor")
        if start + tensor.numel() > numel:
            raise UserValueError(f"{name}: {tensor.numel()} elements from {start} overrun its {numel}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self._data_start + offset + start * dtype.itemsize)
        self._file.write(data)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
