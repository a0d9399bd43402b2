"""Any checkpoint path a command accepts: a run directory (its latest checkpoint), a checkpoint directory
(checkpoint.py) or a Hugging Face DeepSeekMoE directory (hf.py), told apart by `hf_layout.is_hf_directory`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import find_checkpoint, load_checkpoint
from ..model import Transformer
from .hf_load import load_hf_model
from .hf_layout import is_hf_directory


def resolve_checkpoint(path: str | Path) -> Path:
    """An HF directory as it is, else our checkpoint directory (a run's latest)."""
    return Path(path) if is_hf_directory(path) else find_checkpoint(path)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[Transformer, Path]:
    """Load any checkpoint path -> (model in eval mode, checkpoint or HF directory)."""
    if is_hf_directory(path):
        return load_hf_model(path, device, dtype)
    return load_checkpoint(path, device, dtype)
