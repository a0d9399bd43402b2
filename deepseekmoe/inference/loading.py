"""Load a checkpoint and its tokenizer for inference (shared by `generate`, `eval` and `serve`).

Float checkpoints load as trained. A quantized checkpoint (convert/quantize.py) is used straight from its
memory-mapped file: int8 weights are views of the file's pages (read from disk as the matmuls first touch them),
so loading costs about the weight bytes and no copy. `quantize="int8"|"int4"` quantizes an HF directory or a float
checkpoint while it streams it, tensor by tensor, so the float model is never in memory whole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from ..config import ModelConfig
from ..convert.hf_layout import is_hf_directory
from ..convert.load import load_model, resolve_checkpoint
from ..convert.quantize import check_format, read_quantized_checkpoint, read_quantized_state
from ..errors import UserValueError
from ..model import Transformer
from ..model.experts import RoutedExperts
from ..model.quantized import SCALE_SUFFIX, QuantizedLinear, QuantizedWeight
from ..model.init import assign_weights, reset_tables
from ..runtime import for_device, parse_device
from ..filenames import MODEL_FILE, TOKENIZER_FILE


def load_for_inference(path: str | Path, device: str | None = None, quantize: str | None = None,
                       group_size: int = 128) -> tuple[Transformer, Tokenizer, Path]:
    """(model in eval mode, tokenizer, checkpoint dir) for a checkpoint or a run directory (its latest checkpoint).

    `quantize` ("int8" or "int4", int4 with `group_size` columns per scale) quantizes a float checkpoint or an
    HF directory while loading it. The tokenizer is checked before the weights are read, so a missing one fails
    fast with one clear line.
    """
    ckpt = resolve_checkpoint(path)
    tokenizer_path = ckpt / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {TOKENIZER_FILE}; copy the tokenizer the model was "
                                f"trained with into it")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise UserValueError(f"cannot read tokenizer {tokenizer_path}: {exc}") from None
    model = load_weights(ckpt, None if device is None else parse_device(device, "--device"), quantize, group_size)
    for_device(model, model.lm_head.weight.device)
    return model, tokenizer, ckpt


def load_weights(ckpt: Path, device: torch.device | None = None, quantize: str | None = None,
                 group_size: int = 128) -> Transformer:
    """The model of a checkpoint directory or HF directory: quantized where it is stored so or `quantize` asks.
    device None: the CPU for quantized weights, else CUDA when available."""
    stored = None if is_hf_directory(ckpt) else read_quantized_checkpoint(ckpt)
    if device is None:
        device = torch.device("cpu") if stored is not None or quantize is not None else parse_device(None, "--device")
    if stored is not None and quantize is not None and quantize != stored[1]["format"]:
        raise UserValueError(f"{ckpt} is stored in {stored[1]['format']}; --quantize {quantize} cannot requantize it")
    if stored is None and quantize is not None:
        fmt = check_format(quantize, group_size)
        _check_cpu(device, ckpt)
        print(f"deepseekmoe: quantizing {ckpt} to {fmt} while loading", file=sys.stderr)
        stored = read_quantized_state(ckpt, fmt, group_size)
    if stored is not None:
        _check_cpu(device, ckpt)
        return build_quantized_model(stored[0], stored[2], stored[1].get("int4_layout") or "rows")
    if device.type == "cpu" and is_hf_directory(ckpt):
        check_fits_in_memory(ckpt)
    return load_model(ckpt, device=device)[0]


def _check_cpu(device: torch.device, ckpt: Path) -> None:
    if device.type != "cpu":
        raise UserValueError(f"{ckpt}: quantized weights run on the CPU only (its int8/int4 kernels); pass "
                             f"--device cpu "
                         f"or load the float weights on {device}")


def build_quantized_model(config: ModelConfig, state: dict[str, torch.Tensor],
                          int4_layout: str = "rows") -> Transformer:
    """A CPU Transformer from a quantized state in the on-disk layout (convert/quantize.py; int4 bytes in
    `int4_layout`), using its tensors as they are (memory-mapped views stay views, int4 ones where stored in the
    kernel's layout); computes in the dtype of the float tensors (the embeddings')."""
    dtype = state["embed_tokens.weight"].dtype
    with torch.device("meta"):
        model = Transformer(config)

    def take(key: str) -> QuantizedWeight:
        return QuantizedWeight.from_stored(state[key], state[key + SCALE_SUFFIX], dtype, int4_layout)
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedExperts):
            for attr in ("gate_up_proj", "down_proj"):
                weight = take(f"{name}.{attr}")
                delattr(module, attr)
                setattr(module, attr, weight)
        elif isinstance(module, nn.Linear) and f"{name}.weight{SCALE_SUFFIX}" in state:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantizedLinear(take(f"{name}.weight")))
    model.to_empty(device="cpu")
    reset_tables(model)
    floats = {k: v for k, v in state.items() if not k.endswith(SCALE_SUFFIX) and k + SCALE_SUFFIX not in state}
    assign_weights(model, floats)
    return model.eval()


def weight_bytes(ckpt: Path) -> int:
    """Bytes of the weight files of a checkpoint or HF directory."""
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) or (ckpt / MODEL_FILE).stat().st_size


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_fits_in_memory(ckpt: Path) -> None:
    """A float HF model whose routed experts (the part loading copies; the rest is used memory-mapped,
    convert/hf_load.py) exceed the memory available is refused with the way out, before anything is read."""
    from ..convert.hf_load import copied_bytes

    need, have = copied_bytes(ckpt), available_memory()
    if have is not None and need > have:
        raise UserValueError(f"{ckpt} holds {weight_bytes(ckpt) / 1e9:.2f} GB of float weights, {need / 1e9:.2f} GB "
                         f"of them routed experts that loading copies, and this machine has {have / 1e9:.2f} GB "
                         f"of memory available: pass --quantize int8 (about half the bytes) or --quantize int4 "
                         f"(about a quarter)")
