"""Routers: token -> (top-k routed experts, gate weights). Every router returns a RouterOutput.

Shape legend: T tokens (B*S), D hidden, E routed experts, K experts per token.

  * TopKRouter   softmax over the E routed experts (fp32), top-k on the probabilities, gates = raw probabilities
                 (DeepSeekMoE Eqs. 9-11; renormalised only with norm_topk_prob). Serves router kinds
                 "softmax_topk" (any K), "switch" (K = 1) and "gshard" (K = 2). Optional capacity factor drops
                 assignments beyond each expert's capacity (first choices of all tokens take priority over
                 second choices, then token order); dropped assignments keep their index but get gate 0.
                 Capacity is shared by all T tokens of the batch, so with a capacity factor a token's routing
                 depends on other tokens, later ones included (not causal; cached decoding differs from the
                 full forward). The paper's runs are dropless (capacity_factor None), which is causal.
  * HashRouter   a fixed token-id -> expert table, no learned parameters, gate 1 (Hash Layer baseline). The
                 table is a seeded random permutation of the vocabulary dealt round-robin to the experts, so each
                 expert owns the same number of vocabulary entries (+-1); it is rebuilt from (vocab, E, seed).
                 Layer l uses seed hash_seed + l, so different layers hash differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserValueError


@dataclass
class RouterOutput:
    """What one MoE layer decided for T = B*S tokens. Probabilities and logits are fp32."""

    topk_idx_TK: torch.Tensor
    """(T, K) int64 routed-expert ids."""
    topk_weight_TK: torch.Tensor
    """(T, K) fp32 gate weights (0 for assignments dropped by the capacity limit)."""
    probs_TE: torch.Tensor | None
    """(T, E) fp32 routing probabilities s_{i,t}; None for the hash router."""
    logits_TE: torch.Tensor | None
    """(T, E) fp32 router logits (for the z-loss); None for the hash router."""
    expert_counts_E: torch.Tensor
    """(E,) int64 assignments each expert actually processes."""
    batch_size: int
    """B, so per-sequence statistics can reshape T into (B, S)."""

    @property
    def num_experts(self) -> int:
        return self.expert_counts_E.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_idx_TK.shape[1]


class TopKRouter(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts is not None
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        # e_i: one learnable centroid per routed expert, no bias (HF key mlp.gate.weight, shape (E, D)).
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def forward(self, x_TD: torch.Tensor, batch_size: int, input_ids: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = x_TD.float() @ self.weight.float().t()
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK, idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        keep_TK = None
        if self.capacity_factor is not None:
            keep_TK = _within_capacity(idx_TK, self.num_experts, self.capacity_factor)
            weight_TK = weight_TK * keep_TK
        counts_E = _counts(idx_TK, self.num_experts, keep_TK)
        return RouterOutput(idx_TK, weight_TK, probs_TE, logits_TE, counts_E, batch_size)


def _within_capacity(idx_TK: torch.Tensor, num_experts: int, factor: float) -> torch.Tensor:
    """(T, K) bool: True where the assignment fits in its expert's capacity ceil(factor * T * K / E)."""
    t, k = idx_TK.shape
    capacity = math.ceil(factor * t * k / num_experts)
    order = idx_TK.t().reshape(-1)  # slot-major: every token's 1st choice, then every 2nd choice
    one_hot = torch.nn.functional.one_hot(order, num_experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of this assignment within its expert
    return (position < capacity).view(k, t).t()


def _counts(idx_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None) -> torch.Tensor:
    flat = idx_TK.reshape(-1)
    if keep_TK is not None:
        flat = flat[keep_TK.reshape(-1)]
    return torch.bincount(flat, minlength=num_experts)


class HashRouter(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        assert config.n_routed_experts is not None
        self.num_experts = config.n_routed_experts
        self.vocab_size = config.vocab_size
        self.seed = config.hash_seed + layer_idx
        self.register_buffer("table", self._build_table(), persistent=False)

    def _build_table(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(self.vocab_size, generator=g)
        table = torch.empty(self.vocab_size, dtype=torch.long)
        table[perm] = torch.arange(self.vocab_size) % self.num_experts
        return table

    def reset(self) -> None:
        self.table = self._build_table().to(self.table.device)

    def forward(self, x_TD: torch.Tensor, batch_size: int, input_ids: torch.Tensor | None = None) -> RouterOutput:
        if input_ids is None:
            raise UserValueError("the hash router needs the token ids: call MoE(x, input_ids=...)")
        idx_TK = self.table[input_ids.reshape(-1)].unsqueeze(1)
        weight_TK = torch.ones(idx_TK.shape, dtype=torch.float32, device=x_TD.device)
        return RouterOutput(idx_TK, weight_TK, None, None, _counts(idx_TK, self.num_experts, None), batch_size)


def build_router(config: ModelConfig, layer_idx: int = 0) -> nn.Module:
    if config.router == "hash":
        return HashRouter(config, layer_idx)
    if config.router in ("softmax_topk", "switch", "gshard"):
        return TopKRouter(config)
    raise UserValueError(f"router={config.router!r} has no routed experts")
