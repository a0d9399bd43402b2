"""Exact parameter and FLOPs accounting, analytic (instant for the 145B preset; no allocation).

FLOPs per token (training = forward + backward = 3 x forward, 2 FLOPs per multiply-add):
    flops_per_token = 6 * P_matmul + 12 * L * (H * hd) * S
  P_matmul: activated parameters that take part in a matrix multiply: attention projections, dense FFNs, shared
            experts, the K activated routed experts, the router, and the LM head. The input embedding (a lookup) and
            norm weights are excluded.
  12 L H hd S: attention scores QK^T and the weighted sum AV (4 H hd S per layer forward), counted for the full
            S x S square as in the DeepSeek LLM / Chinchilla convention (no causal halving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig
from .errors import UserValueError


@dataclass
class Accounting:
    total_params: int
    active_params: int
    flops_per_token: int
    seq_len: int
    flops_per_sequence: int
    expert_combinations: int
    matmul_params: int
    moe_layers: int


def _attention_params(c: ModelConfig) -> int:
    d, h, hkv, hd = c.hidden_size, c.num_attention_heads, c.num_kv_heads, c.head_dim
    return d * h * hd * 2 + d * hkv * hd * 2  # q, o + k, v


def _ffn_params(d: int, width: int) -> int:
    return 3 * d * width


def _layer_params(c: ModelConfig, layer_idx: int, active: bool) -> int:
    """Matmul parameters of one block (norms excluded)."""
    d = c.hidden_size
    n = _attention_params(c)
    if not c.is_moe_layer(layer_idx):
        return n + _ffn_params(d, c.intermediate_size)
    assert c.n_routed_experts is not None
    routed = c.num_experts_per_tok if active else c.n_routed_experts
    router = 0 if c.router == "hash" else c.n_routed_experts * d
    return (n + router + _ffn_params(d, c.moe_intermediate_size) * (routed + c.n_shared_experts))


def count(config: ModelConfig, seq_len: int | None = None) -> Accounting:
    c = config
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise UserValueError(f"seq_len={seq_len!r} is invalid: expected an integer >= 1")
    s = seq_len or c.max_position_embeddings
    d, v, layers = c.hidden_size, c.vocab_size, c.num_hidden_layers
    norms = d * (2 * layers + 1)
    embed = v * d
    head = 0 if c.tie_word_embeddings else v * d
    blocks_total = sum(_layer_params(c, i, active=False) for i in range(layers))
    blocks_active = sum(_layer_params(c, i, active=True) for i in range(layers))
    total = embed + head + norms + blocks_total
    active = embed + head + norms + blocks_active
    matmul = blocks_active + v * d  # the LM head multiplies even when its weight is tied
    flops = 6 * matmul + 12 * layers * c.num_attention_heads * c.head_dim * s
    combos = math.comb(c.n_routed_experts, c.num_experts_per_tok) if c.is_moe else 1
    return Accounting(total, active, flops, s, flops * s, combos, matmul, c.num_moe_layers)


def estimate_mfu(config: ModelConfig, seq_len: int, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware peak."""
    return count(config, seq_len).flops_per_token * tokens_per_second / peak_flops
