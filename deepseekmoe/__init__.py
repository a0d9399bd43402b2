"""DeepSeekMoE: fine-grained and shared-expert Mixture-of-Experts language models on PyTorch."""

from .config import ModelConfig
from .model import MoE, RouterOutput, Transformer, TransformerOutput
from .presets import load_preset, preset_names
from .version import __version__

__all__ = ["ModelConfig", "MoE", "RouterOutput", "Transformer", "TransformerOutput", "load_preset",
           "preset_names"]
