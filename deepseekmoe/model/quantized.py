"""Weight-only quantization: the math, a quantized weight that stands where a float weight would, and its kernels.

Two formats, both symmetric (no zero point), for a weight W of shape (..., O, I) (nn.Linear convention, out x in;
a leading dimension stacks the routed experts):

  int8  one scale per output row:   s_o = max_i |W_oi| / 127,  q_oi = round(W_oi / s_o) in [-127, 127]
  int4  one scale per group of G input columns:  s_og = max_{i in g} |W_oi| / 7,  q_oi = round(W_oi / s_og)
        clamped to [-8, 7]; stored as q + 8 in a nibble, column 2j in the low nibble of byte j, column 2j+1 in
        the high one

W is recovered as q * s (a row of all zeros gets s = 1). The int4 kernel takes O a multiple of 16 and G in
`GROUP_SIZES`; a weight with no such G dividing I (`int4_group_size`) stays in int8 in an int4 checkpoint. On disk
(convert/quantize.py) a quantized NAME is the int8 (..., O, I) or uint8 (..., O, I/2) tensor NAME (int4 bytes in
one of the layouts of model/int4_layout.py) plus the float32 scales NAME_scale, (..., O) or (..., O, I/G).

`QuantizedWeight` holds the quantized data and its scales in the compute dtype. `linear(x, w)` is x @ W^T for a
float or a quantized w, so the experts' kernels (model/experts.py) and the runtime's small-row matmuls take either.
The kernels are PyTorch's own CPU weight-only matmuls, `_weight_int8pack_mm` (int8, up to `INT8_MM_MAX_ROWS` rows)
and `_weight_int4pack_mm_for_cpu` (int4, at every row count; it reads its own blocked layout, which a checkpoint
stores where it was written on a machine with the same one, and which is made at load otherwise);
more rows of int8 multiply the int8 values cast to the compute dtype and scale the product's output columns
(measured: benchmarks/README.md).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .int4_layout import kernel_layout, relayout

Format = Literal["int8", "int4"]
FORMATS: tuple[str, ...] = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
SCALE_SUFFIX = "_scale"
INT8_MM_MAX_ROWS = {torch.bfloat16: 32, torch.float16: 32, torch.float32: 1}
"""Up to this many rows (by compute dtype) int8 runs `_weight_int8pack_mm`; more rows cast, multiply, then scale
(in fp32 the int8 kernel loses from two rows on; in bf16 it wins at decode and ties near 32 rows)."""


# --------------------------------------------------------------------------------------------------- the math
def _scales(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., O, I) float -> (q int8 (..., O, I), scales float32 (..., O))."""
    w = w.float()
    s = _scales(w.abs().amax(-1), 127)
    return torch.round(w / s[..., None]).clamp_(-127, 127).to(torch.int8), s


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., O, I) float -> (nibbles uint8 (..., O, I/2), scales float32 (..., O, I/G))."""
    *lead, o, i = w.shape
    g = w.float().reshape(*lead, o, i // group_size, group_size)
    s = _scales(g.abs().amax(-1), 7)
    q = torch.round(g / s[..., None]).clamp_(-8, 7).reshape(*lead, o, i).to(torch.int16) + 8
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8), s


def unpack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 (..., O, I/2) -> the signed values int8 (..., O, I) in [-8, 7]."""
    low, high = (nibbles & 0xF).to(torch.int8) - 8, (nibbles >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)


def dequantize(q: torch.Tensor, scales: torch.Tensor, fmt: Format, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (..., O, I) that q and its scales stand for."""
    if fmt == "int8":
        return (q.to(torch.float32) * scales.float()[..., None]).to(dtype)
    values = unpack_int4(q).float()
    group = values.shape[-1] // scales.shape[-1]
    return (values * scales.float().repeat_interleave(group, dim=-1)).to(dtype)


def quantize(w: torch.Tensor, fmt: Format, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, float32 scales) of w in `fmt` (see the module docstring)."""
    return quantize_int8(w) if fmt == "int8" else quantize_int4(w, group_size)


GROUP_SIZES = (32, 64, 128, 256)
"""The int4 group sizes the CPU kernel takes."""


def int4_group_size(shape: tuple[int, ...], group_size: int) -> int | None:
    """The group size an (..., O, I) weight gets in an int4 checkpoint: the largest allowed one up to `group_size`
    that divides I, where the kernel takes O (a multiple of 16); None: the weight is stored in int8 instead."""
    *_, o, i = shape
    if o % 16:
        return None
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if g <= group_size and i % g == 0), None)


# -------------------------------------------------------------------------------------------- the weight
KERNEL_ALIGNMENT = 64
"""`_weight_int8pack_mm` reads its weight with aligned vector loads: a weight not on a 64-byte boundary crashes it
(a quantized checkpoint's tensors are aligned; others are copied at load)."""
ROW_BLOCK = 64
"""Output rows of a weight split between workers come in multiples of this (the int4 kernel's row block)."""


class QuantizedWeight:
    """A quantized (..., O, I) weight in the compute dtype `dtype`: indexable along the leading (expert)
    dimension like a stacked float weight; `linear(x, w)` multiplies by it. Never trained (requires_grad False).

    int8 keeps `data` as stored (int8, a memory-mapped view where loaded from a file) and `scales` (..., O).
    int4 keeps `data` in the CPU kernel's packed layout (a memory-mapped view where stored in it) and `scales` as
    its (..., I/G, O, 2) scales-and-zeros."""

    requires_grad = False

    def __init__(self, fmt: Format, data: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...],
                 group_size: int | None = None) -> None:
        self.fmt, self.data, self.scales, self.shape, self.group_size = fmt, data, scales, shape, group_size

    @classmethod
    def from_stored(cls, data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    layout: str = "rows") -> "QuantizedWeight":
        """From the on-disk form (module docstring; the format is the data's dtype, the group size follows from
        the shapes; int4 bytes in `layout`, model/int4_layout.py): int8 data as is, int4 data as is where it is in
        the kernel's layout, else converted to it."""
        if data.dtype == torch.int8:
            return cls("int8", _aligned(data), scales.to(dtype), tuple(data.shape))
        shape = (*data.shape[:-1], data.shape[-1] * 2)
        group_size = shape[-1] // scales.shape[-1]
        target = kernel_layout()
        packed = relayout(data, layout, target) if target else _pack_for_kernel(relayout(data, layout, "rows"))
        zeros = torch.zeros_like(scales, dtype=dtype)
        scales_zeros = torch.stack([scales.to(dtype), zeros], dim=-1).transpose(-3, -2).contiguous()
        return cls("int4", packed, scales_zeros, shape, group_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    def __getitem__(self, e: int) -> "QuantizedWeight":
        data = _aligned(self.data[e]) if self.fmt == "int8" else self.data[e]  # the int4 kernel loads unaligned
        return QuantizedWeight(self.fmt, data, self.scales[e], self.shape[1:], self.group_size)

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows [start, end) of a 2-D weight, as views (int4: start a multiple of `ROW_BLOCK`, end too or
        the last row: the kernel's layout packs blocks of 64 rows contiguously)."""
        if self.fmt == "int8":
            return QuantizedWeight("int8", _aligned(self.data[start:end]), self.scales[start:end],
                                   (end - start, self.shape[1]))
        half = self.shape[1] // 2
        data = self.data.view(-1)[start * half:end * half].view(end - start, half)
        return QuantizedWeight("int4", data, self.scales[:, start:end].contiguous(), (end - start, self.shape[1]),
                               self.group_size)

    def to(self, dtype: torch.dtype) -> "QuantizedWeight":
        """The same weight computing in `dtype` (its scales cast; the data is shared)."""
        if dtype == self.dtype:
            return self
        return QuantizedWeight(self.fmt, self.data, self.scales.to(dtype), self.shape, self.group_size)

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"QuantizedWeight({self.fmt}, shape={list(self.shape)}{group}, dtype={self.dtype})"


PACK_ROWS = 4096
"""int4 weights are repacked for the kernel this many rows at a time (a multiple of ROW_BLOCK)."""


def _aligned(data: torch.Tensor) -> torch.Tensor:
    """data, or an aligned copy of it where it does not start on a KERNEL_ALIGNMENT boundary."""
    return data.clone() if data.data_ptr() % KERNEL_ALIGNMENT else data


def _pack_for_kernel(nibbles: torch.Tensor) -> torch.Tensor:
    """Rows of nibbles (..., O, I/2) -> `_weight_int4pack_mm_for_cpu`'s packed layout by its own packing, one
    matrix at a time (where that layout is none that model/int4_layout.py knows)."""
    if nibbles.dim() > 2:  # experts: packed one at a time into one tensor (never two copies of the layer)
        first = _pack_for_kernel(nibbles[0])
        packed = torch.empty((nibbles.shape[0], *first.shape), dtype=first.dtype)
        packed[0] = first
        for e in range(1, nibbles.shape[0]):
            packed[e] = _pack_for_kernel(nibbles[e])
        return packed
    if nibbles.shape[0] > PACK_ROWS:  # blocks of rows (the layout keeps 64-row blocks contiguous): small int32 copies
        packed = torch.empty_like(nibbles)
        for start in range(0, nibbles.shape[0], PACK_ROWS):
            block = nibbles[start:start + PACK_ROWS]
            packed[start:start + block.shape[0]] = _pack_for_kernel(block).view(block.shape)
        return packed
    values = (unpack_int4(nibbles).to(torch.int32) + 8).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)


def quantized_linear(x_NI: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x @ W^T for 2-D x in w's compute dtype, by the kernel for its format and row count."""
    x_NI = x_NI.to(w.dtype).contiguous()
    if w.fmt == "int4":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_NI, w.data, w.group_size, w.scales)
    if x_NI.shape[0] <= INT8_MM_MAX_ROWS.get(w.dtype, 0):
        return torch.ops.aten._weight_int8pack_mm(x_NI, w.data, w.scales)
    return F.linear(x_NI, w.data.to(w.dtype)) * w.scales  # the scales on the N x O output, not the O x I weight


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x @ W^T over the last dimension of x, for a float or a quantized W."""
    if not isinstance(w, QuantizedWeight):
        return F.linear(x, w)
    return quantized_linear(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])


class QuantizedLinear(nn.Module):
    """nn.Linear (no bias) with a QuantizedWeight: the attention projections, FFNs, shared experts, LM head.
    `matmul` is x @ W^T for 2-D x; a runtime applied from outside may replace it (deepseekmoe.runtime.cpu)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.matmul = quantized_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features), self.weight)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return repr(self.weight)
