"""Machine-specific ways to run a built model faster, applied from outside like expert parallelism.

`for_device(model, device)` is what the commands call once, after building (and parallelising) a model: on a CPU
with more than one intra-op thread it applies `cpu.CpuRuntime`: the calling thread keeps one intra-op thread, and
large matmuls and routed experts run on single-threaded worker threads that take parts as they finish one
(measured far steadier on a busy machine, benchmarks/README.md); on any CPU glibc's malloc keeps freed memory for
reuse where the model is small (`cpu.keep_freed_memory`); elsewhere it leaves the model as built.
`describe(model, device, dtype)` says what runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserValueError
from ..model.experts import RoutedExperts
from .cpu import CpuRuntime, intra_op_threads, keep_freed_memory


def parse_device(name: str | None, setting: str) -> torch.device:
    """The device `name` names (None or "auto": CUDA when available, else CPU); an unknown name or CUDA on a
    machine without it is a ValueError naming `setting` (the option or config key it came from)."""
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserValueError(f"{setting}={name!r} is not a device: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserValueError(f"{setting}={name!r} but no CUDA device is available")
    return device


def for_device(model: nn.Module, device: torch.device | str) -> CpuRuntime | None:
    """Apply the runtime this device gets (see the module docstring); returns it, or None. On any CPU, with one
    intra-op thread too, freed memory is kept for reuse where the model is small (cpu.keep_freed_memory)."""
    if torch.device(device).type != "cpu":
        return None
    if intra_op_threads() < 2:
        keep_freed_memory(model)  # CpuRuntime.apply does it otherwise
        return None
    return CpuRuntime.apply(model)


def describe(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> str:
    """The routed experts' implementation on this device at this compute dtype, e.g. "grouped (grouped_mm)"."""
    experts = next((m for m in model.modules() if isinstance(m, RoutedExperts)), None)
    return "none (dense)" if experts is None else experts.describe(torch.device(device).type, dtype)
