"""The DeepSeekMoE layer: shared experts + router + routed experts (paper Eqs. 9-11), no residual.

Shape legend: B batch, S sequence, T = B*S tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .experts import RoutedExperts
from .init import drawing_on_meta, init_weights
from .layers import FeedForward
from .router import RouterOutput, build_router


class MoE(nn.Module):
    """y = sum_{shared} FFN_i(x) + sum_{routed i} g_{i,t} FFN_i(x).

    The K_s shared experts are one FeedForward of width K_s * moe_intermediate_size (equal to their sum).
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.gate = build_router(config, layer_idx)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            FeedForward(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )
        if self.experts.gate_up_proj.device.type != "meta" or drawing_on_meta():
            init_weights(self, config.initializer_range)  # a standalone MoE(config) is usable at once

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """x (B, S, D) -> (y (B, S, D), RouterOutput). input_ids (B, S) is needed by the hash router only."""
        b, s, d = x.shape
        x_TD = x.reshape(b * s, d)
        # 1. route: top-k routed experts and their gate weights (fp32)
        routing = self.gate(x_TD, batch_size=b, input_ids=input_ids)
        # 2-4. dispatch tokens to their experts, run the experts, combine weighted by the gates
        y_TD = self.experts(x_TD, routing.topk_idx_TK, routing.topk_weight_TK)
        # 5. + shared experts: always on, weight 1, on the unpermuted input
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(b, s, d), routing
