"""DeepSeekMoE: fine-grained and shared-expert Mixture-of-Experts language models on PyTorch."""

from .config import ModelConfig
from .model import MoE, RouterOutput, Transformer, TransformerOutput
from .presets import load_preset, preset_names

__all__ = ["ModelConfig", "MoE", "RouterOutput", "Transformer", "TransformerOutput", "load_preset",
           "preset_names"]
__version__ = "0.1.0"
