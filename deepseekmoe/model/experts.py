"""Routed experts with stacked weights, and two implementations of one interface.

Shape legend: T tokens, D hidden, E routed experts, K experts per token, F expert hidden, R = T*K rows.

Weights (HF-transformers v5 layout, nn.Linear convention out x in):
    gate_up_proj (E, 2F, D)  rows [0, F) are gate_proj, rows [F, 2F) are up_proj
    down_proj    (E, D, F)

  * "loop"     the readable reference: for each expert, gather its tokens, run SwiGLU, scatter-add. Test oracle.
  * "grouped"  dropless dispatch: flatten the (token, slot) pairs, stable-sort by expert, gather rows into
               expert-contiguous order, run the SwiGLU per contiguous group, scale by the gates, scatter-add back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RoutedExperts(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts is not None
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, d, f
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self.impl = config.experts_impl

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        if self.impl == "loop":
            return experts_loop(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.down_proj)
        return experts_grouped(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.down_proj)


def _swiglu(x_RD: torch.Tensor, gate_up_2FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    gate_RF, up_RF = F.linear(x_RD, gate_up_2FD).chunk(2, dim=-1)
    return F.linear(F.silu(gate_RF) * up_RF, down_DF)


def experts_loop(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Reference: y_t = sum_k w_{t,k} * FFN_{idx_{t,k}}(x_t), one expert at a time."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(gate_up_proj.shape[0]):
        token_idx, slot_idx = torch.where(topk_idx_TK == e)
        if token_idx.numel() == 0:
            continue
        y = _swiglu(x_TD[token_idx], gate_up_proj[e], down_proj[e])
        w = topk_weight_TK[token_idx, slot_idx].unsqueeze(-1).to(y.dtype)
        out_TD.index_add_(0, token_idx, y * w)
    return out_TD


def experts_grouped(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Sort-based dropless dispatch; the per-group SwiGLU runs on contiguous row blocks."""
    t, k = topk_idx_TK.shape
    flat_idx_R = topk_idx_TK.reshape(-1)
    order_R = torch.argsort(flat_idx_R, stable=True)
    token_of_row_R = order_R // k
    counts_E = torch.bincount(flat_idx_R, minlength=gate_up_proj.shape[0])
    x_RD = x_TD[token_of_row_R]  # expert-contiguous copy of the routed rows
    y_RD = _grouped_swiglu(x_RD, counts_E, gate_up_proj, down_proj)
    y_RD = y_RD * topk_weight_TK.reshape(-1)[order_R].unsqueeze(-1).to(y_RD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_of_row_R, y_RD)


def _grouped_swiglu(x_RD: torch.Tensor, counts_E: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each expert over its contiguous block of rows."""
    outputs = []
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            outputs.append(_swiglu(x_RD[start:start + n], gate_up_proj[e], down_proj[e]))
        start += n
    if not outputs:
        return x_RD.new_zeros(x_RD.shape)
    return torch.cat(outputs)
