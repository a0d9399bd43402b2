from .attention import KVCache
from .moe import MoE
from .router import RouterOutput
from .transformer import Transformer, TransformerOutput

__all__ = ["KVCache", "MoE", "RouterOutput", "Transformer", "TransformerOutput"]
