"""Load a checkpoint and its tokenizer for inference (shared by `generate` and `eval`)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..model import Transformer
from ..runtime import for_device, parse_device
from ..train.checkpoint import TOKENIZER_FILE, load_model, resolve_checkpoint


def pick_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when available, else CPU."""
    return parse_device(device, "--device")


def load_for_inference(path: str | Path, device: str | None = None) -> tuple[Transformer, Tokenizer, Path]:
    """(model in eval mode, tokenizer, checkpoint dir) for a checkpoint or a run directory (its latest checkpoint).

    The tokenizer is checked before the weights are read, so a missing one fails fast with one clear line.
    """
    ckpt = resolve_checkpoint(path)
    tokenizer_path = ckpt / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {TOKENIZER_FILE}; copy the tokenizer the model was "
                                f"trained with into it")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise ValueError(f"cannot read tokenizer {tokenizer_path}: {exc}") from None
    model, ckpt = load_model(ckpt, device=pick_device(device))
    for_device(model, model.lm_head.weight.device)
    return model, tokenizer, ckpt
