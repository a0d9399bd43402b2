"""The "rows" strategy of the routed experts: decode without autograd.

Only the experts that got rows run, each as two plain matmuls in the operand order that is fastest for its row
count (`layers.linear_rows`), in the calling thread or, where the weights to stream are large, on the CPU workers
together with the shared experts. Shape legend as in experts.py.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_workers import run_chunks
from .layers import linear_rows


def rows_forward(x_TD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weight_R: torch.Tensor,
                 token_R: torch.Tensor, counts: list[int],
                 shared: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """"rows": only the experts that got rows, each as two matmuls in the operand order fastest for its row count
    (`layers.linear_rows`), without autograd, plus shared(x) where given. In the calling thread or, where the
    weights to read are large enough to pay for the hand-off, on the CPU workers, the shared experts as one more
    chunk (decode streams weights, and two cores stream faster than one: 16B layer, 1 token, ~0.65x transformers)."""
    tokens, weights = token_R.split(counts), weight_R.split(counts)
    used = [e for e, n in enumerate(counts) if n]
    expert_bytes = (gate_up_proj[0].numel() + down_proj[0].numel()) * gate_up_proj.element_size()
    shared_bytes = _parameter_bytes(shared)
    workers = 0
    if x_TD.device.type == "cpu" and torch.get_num_threads() > 1:
        workers = (len(used) * expert_bytes + shared_bytes) // ROWS_MIN_WEIGHT_BYTES_PER_WORKER
        workers = min(torch.get_num_threads(), workers) if workers > 1 else 0
    chunks: list[list] = [[e] for e in used] if workers else [used]
    if shared is not None and workers:
        chunks.insert(0, [shared])  # the largest chunk first
    outs = [torch.zeros_like(x_TD) for _ in range(max(1, workers))]
    run_chunks(_rows_chunk, chunks, outs, workers, x_TD, gate_up_proj, down_proj, tokens, weights)
    out_TD = _sum(outs)
    return out_TD.add_(shared(x_TD)) if shared is not None and not workers else out_TD


def _parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in _parameters(module))


ROWS_MIN_WEIGHT_BYTES_PER_WORKER = 64 << 20
""""rows" hands experts to the CPU workers only from this many bytes of chosen expert weights per worker: below,
the hand-off (~1 ms here, waking an idle core included) costs more than a second core streaming saves."""


def _rows_chunk(experts, out_TD, x_TD, gate_up_proj, down_proj, tokens, weights) -> None:
    """experts: routed expert ids, or [shared] (the shared experts, on every token with weight 1)."""
    for e in experts:
        if not isinstance(e, int):
            out_TD.add_(e(x_TD))
            continue
        y_ND = _expert_rows(x_TD.index_select(0, tokens[e]), gate_up_proj[e], down_proj[e], weights[e])
        out_TD.index_add_(0, tokens[e], y_ND)


def _expert_rows(x_ND: torch.Tensor, gate_up_2FD: torch.Tensor, down_DF: torch.Tensor,
                 w_N: torch.Tensor) -> torch.Tensor:
    """w * SwiGLU(x) for one expert's rows, no autograd bookkeeping."""
    gate_NF, up_NF = linear_rows(x_ND, gate_up_2FD).chunk(2, dim=-1)
    return linear_rows(F.silu(gate_NF).mul_(up_NF).mul_(w_N.unsqueeze(-1)), down_DF)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out.add_(t)
    return out


def _parameters(module) -> list[torch.Tensor]:
    return list(module.parameters()) if isinstance(module, nn.Module) else []
