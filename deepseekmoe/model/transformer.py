"""Decoder-only Transformer: embeddings, pre-norm blocks (attention + dense FFN or MoE), final norm, LM head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserValueError
from .attention import Attention, KVCache
from .init import init_weights
from .layers import FeedForward, RMSNorm, RotaryEmbedding
from .moe import MoE
from .router import RouterOutput


@dataclass
class TransformerOutput:
    logits: torch.Tensor
    """(B, S, V) next-token logits."""
    router_outputs: list[RouterOutput] = field(default_factory=list)
    """One per MoE layer, in layer order."""


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe_layer = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(config, layer_idx) if self.is_moe_layer else FeedForward(config.hidden_size, config.intermediate_size)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor,
                cache: KVCache | None, input_ids: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache, key_mask)
        h = self.post_attention_layernorm(x)
        if self.is_moe_layer:
            y, routing = self.mlp(h, input_ids=input_ids)
            return x + y, routing
        return x + self.mlp(h), None


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Every weight matrix ~ N(0, initializer_range) (paper: 0.006); norms = 1; rebuild fixed tables."""
        init_weights(self, self.config.initializer_range, generator)

    def use_decode_paths(self, enabled: bool = True) -> None:
        """Turn the decode paths (model/layers.py: q/k/v as one matmul, one rotation for q and k, the routed experts'
        few-rows form) on or off in every module; off, a decode step runs the plain modules' ops (A/B measurements,
        tests)."""
        for m in self.modules():
            if hasattr(m, "decode_path"):
                m.decode_path = enabled

    def moe_layers(self) -> list[MoE]:
        """The MoE blocks (`layers[i].mlp` of each MoE layer), in layer order."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def new_kv_caches(self, batch_size: int, max_len: int | None = None,
                      dtype: torch.dtype | None = None) -> list[KVCache]:
        """One static KV cache per layer, for incremental decoding."""
        c = self.config
        w = self.embed_tokens.weight
        return [KVCache(batch_size, c.num_kv_heads, max_len or c.max_position_embeddings, c.head_dim,
                        dtype or w.dtype, w.device) for _ in self.layers]

    def forward(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor = 0, kv_caches: list[KVCache] | None = None,
                attention_mask: torch.Tensor | None = None) -> TransformerOutput:
        """input_ids (B, S) at absolute positions [start_pos, start_pos + S) -> logits and routing.

        attention_mask (B, start_pos + S) bool marks real tokens (True) among left padding, for batching prompts of
        different lengths: rotary attention depends only on relative positions, so a left-padded row gives the
        same logits for its real tokens as the unpadded sequence. Padding tokens still pass through the MoE
        layers (dropless routing treats tokens independently) but are routed and counted in RouterOutput.

        start_pos may also be a (B,) long tensor: row b sits at [start_pos[b], start_pos[b] + S) and uses row b of
        each cache (per-sequence cache rows, see attention.py); attention_mask is then not needed.
        """
        b, s = input_ids.shape
        per_row = isinstance(start_pos, torch.Tensor)
        end = (int(start_pos.max()) if per_row else start_pos) + s
        if end > self.config.max_position_embeddings:
            raise UserValueError(f"sequence reaches position {end}, beyond "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if per_row:
            cos, sin = self.rotary(start_pos[:, None] + torch.arange(s, device=input_ids.device))
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, S, hd): one table per row, shared by the heads
        else:
            cos, sin = self.rotary(torch.arange(start_pos, start_pos + s, device=input_ids.device))
        x = self.embed_tokens(input_ids)
        router_outputs = []
        for i, layer in enumerate(self.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            x, routing = layer(x, cos, sin, start_pos, cache, input_ids, attention_mask)
            if routing is not None:
                router_outputs.append(routing)
        return TransformerOutput(self.lm_head(self.norm(x)), router_outputs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
