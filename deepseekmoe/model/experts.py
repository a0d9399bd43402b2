"""Routed experts: stacked weights and two implementations of one interface.

Shape legend: T tokens, D hidden, E routed experts, K experts per token, F expert hidden, R = T*K rows
(one row per (token, slot) pair), N the rows of one expert.

Weights (HF-transformers v5 layout, nn.Linear convention out x in):
    gate_up_proj (E, 2F, D)  rows [0, F) are gate_proj, rows [F, 2F) are up_proj
    down_proj    (E, D, F)

`config.experts_impl` picks the implementation:
  * "loop"     the readable reference: for each expert, gather its tokens, run SwiGLU, add the gated result into
               its tokens. The test oracle.
  * "grouped"  dropless sorted dispatch (`experts_grouped`):
                 1. flatten the R (token, slot) pairs and stable-sort them by expert: each expert's rows are one
                    contiguous segment;
                 2. run each expert's SwiGLU on its segment, scaled by the gate weights, with the kernel
                    `choose_kernel` picks from the device and the compute dtype (after autocast): "grouped_mm"
                    (torch's grouped GEMM over the segment offsets: no host sync, no Python loop) or "per_expert"
                    (plain matmuls segment by segment, any dtype and width; one host sync for the counts);
                 3. combine: add the rows into their tokens (`index_add_`), in sorted order.
               Without gradients, a few fp32 rows (decode: `FEW_ROWS`) take the per-expert kernel's few-rows form:
               each expert's two matmuls write into row buffers shared by all experts, and the SwiGLU, the gate
               weights and the combine run once over all rows instead of once per expert (in bf16 the runner's
               weight-major `linear` is the faster matmul on the CPU, so bf16 keeps the per-expert form). One
               token (a batch-1 decode step) whose K experts' weights are small (`ONE_TOKEN_MAX_BYTES`) skips the
               sort: its experts' weights are gathered and multiplied by two batched matmuls (`_one_token_forward`).
               Backward is hand-written (`_GroupedExperts`): weight gradients are written per expert (autograd
               through `weight[e]` would zero-fill a full (E, 2F, D) tensor per expert), the gates scale h before
               down_proj so d(gate) = <dh, h>, and h = silu(g) * u is recomputed from the saved gate/up projection.

Both weights may instead be `QuantizedWeight`s (model/quantized.py, inference only): indexed per expert like the
float stacks, multiplied by `quantized.linear`, always through the per-expert kernel (or the loop).

The per-expert kernel hands its segments to a `SegmentRunner`: by default they run one after another in the calling
thread (`INLINE`); a runtime applied from outside (`deepseekmoe.runtime.cpu`) runs chunks of experts on worker
threads. Either way every sum has a fixed order: a chunk writes only its own experts' weight gradients and rows,
and its outputs are added into the shared token tensor by a commit that the runner runs in expert order. So the
same inputs give the same bits however the chunks are scheduled. `index_add_` is sequential on CPU; on CUDA it
uses atomics unless `torch.use_deterministic_algorithms(True)` is on (`train.deterministic`).
"""

from __future__ import annotations

import itertools
from contextlib import nullcontext
from typing import Callable, Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .quantized import QuantizedWeight, linear

Kernel = Literal["grouped_mm", "per_expert"]
Commit = Callable[[], None]


class SegmentRunner(Protocol):
    """Runs fn(chunk) for chunks of the experts, in expert order, and then the `Commit` each returns, in chunk
    order. fn computes and writes only what belongs to its own experts (any order or concurrency gives the same
    result); the commit adds its rows into the shared token output, so those sums always run in expert order.
    `linear` is the matmul x @ W^T that segments use when nothing is differentiated."""

    def run(self, fn: Callable[[list[int]], Commit], experts: list[int], rows: list[int]) -> None: ...

    def linear(self, x_NI: torch.Tensor, weight_OI: torch.Tensor) -> torch.Tensor: ...

    def parallel(self, rows: list[int]) -> bool:
        """Whether `run` would hand a call with these rows per expert to other threads."""


class InlineRunner:
    """Every expert in the calling thread, in expert order, each committed at once (so no more than one expert's
    outputs wait for their commit)."""

    def run(self, fn: Callable[[list[int]], Commit], experts: list[int], rows: list[int]) -> None:
        for e in experts:
            fn([e])()

    linear = staticmethod(linear)

    def parallel(self, rows: list[int]) -> bool:
        return False

    def __repr__(self) -> str:
        return "inline"


INLINE = InlineRunner()


class RoutedExperts(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts is not None
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, d, f
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self.impl = config.experts_impl
        self.runner: SegmentRunner = INLINE
        """Where the per-expert kernel's segments run; replaced from outside (deepseekmoe.runtime.cpu)."""
        self.pinned_kernel: Kernel | None = None
        """A kernel to use instead of the chosen one (benchmarks); None: `kernel` decides."""
        self.decode_path = True
        """Whether a few rows without gradients take the few-rows form (module docstring)."""

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        """y_t = sum_k w_{t,k} * FFN_{idx_{t,k}}(x_t), in x_TD's dtype."""
        if self.impl == "loop":
            return experts_loop(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.down_proj)
        kernel = self.kernel(x_TD.device.type, compute_dtype(x_TD))
        return experts_grouped(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.down_proj, kernel,
                               self.runner, few_rows=self.decode_path)

    def kernel(self, device_type: str, dtype: torch.dtype) -> Kernel | None:
        """The grouped kernel used on this device type at this compute dtype (None for "loop")."""
        if self.impl == "loop":
            return None
        if self.pinned_kernel is not None:
            return self.pinned_kernel
        if self.runner is not INLINE or isinstance(self.gate_up_proj, QuantizedWeight):
            return "per_expert"
        return choose_kernel(device_type, dtype, self.hidden_size, self.intermediate_size)

    def describe(self, device_type: str, dtype: torch.dtype) -> str:
        """What runs, in words: "grouped (grouped_mm)", "grouped (per_expert, inline)", "loop"."""
        kernel = self.kernel(device_type, dtype)
        if kernel is None:
            return "loop"
        return f"grouped ({kernel})" if kernel == "grouped_mm" else f"grouped (per_expert, {self.runner!r})"

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, impl={self.impl}, runner={self.runner!r}"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: the autocast dtype where autocast is on for x's device."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def choose_kernel(device_type: str, dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> Kernel:
    """"grouped_mm" on CUDA in bf16 where every row stride is a multiple of 16 bytes (torch's grouped GEMM: no host
    sync, no Python loop; in fp32 it is a slow fallback there), "per_expert" elsewhere. torch's CPU grouped GEMM
    takes fp32 and bf16 too, but is the slower kernel on the CPU measured (S1 training 1.39x the dense FFN against
    1.18x per expert: benchmarks/README.md)."""
    if not hasattr(F, "grouped_mm") or device_type != "cuda" or dtype != torch.bfloat16:
        return "per_expert"
    align = 16 // torch.empty((), dtype=dtype, device="meta").element_size()
    return "grouped_mm" if hidden_size % align == 0 and intermediate_size % align == 0 else "per_expert"


def _swiglu(x_ND: torch.Tensor, gate_up_2FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    gate_NF, up_NF = linear(x_ND, gate_up_2FD).chunk(2, dim=-1)
    return linear(F.silu(gate_NF) * up_NF, down_DF)


def experts_loop(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """Reference: y_t = sum_k w_{t,k} * FFN_{idx_{t,k}}(x_t), one expert at a time."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(gate_up_proj.shape[0]):
        token_idx, slot_idx = torch.where(topk_idx_TK == e)
        if token_idx.numel() == 0:
            continue
        y = _swiglu(x_TD[token_idx], gate_up_proj[e], down_proj[e])
        w = topk_weight_TK[token_idx, slot_idx].unsqueeze(-1)
        out_TD.index_add_(0, token_idx, (y * w).to(out_TD.dtype))
    return out_TD


# ---------------------------------------------------------------------------------------- sorted dispatch
class SortedRows(NamedTuple):
    """The R (token, slot) rows sorted by expert (step 1): each expert's rows are one contiguous segment."""
    order_R: torch.Tensor
    """Sorted row -> its flat (token, slot) index t * K + k."""
    token_R: torch.Tensor
    """Sorted row -> its token."""
    counts_E: torch.Tensor
    """Rows per expert, in expert order."""


def sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> SortedRows:
    """Flatten the (token, slot) pairs, stable-sort them by expert id, count the rows of each expert."""
    flat_idx_R = topk_idx_TK.reshape(-1)
    order_R = torch.argsort(flat_idx_R, stable=True)
    counts_E = torch.bincount(flat_idx_R, minlength=num_experts)
    return SortedRows(order_R, order_R // topk_idx_TK.shape[1], counts_E)


def experts_grouped(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, kernel: Kernel,
                    runner: SegmentRunner = INLINE, few_rows: bool = True) -> torch.Tensor:
    """Dropless sorted dispatch (module docstring, steps 1-3), matmuls in the compute dtype, result in x's dtype;
    `few_rows`: whether a few rows without gradients take the few-rows form."""
    if x_TD.shape[0] == 0:
        return torch.zeros_like(x_TD)
    device_type, out_dtype = x_TD.device.type, x_TD.dtype
    dtype = compute_dtype(x_TD)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, gate_up_proj, down_proj,
                                                                            topk_weight_TK))
    if (few_rows and not wants_grad and x_TD.shape[0] == 1 and dtype == torch.float32
            and isinstance(gate_up_proj, torch.Tensor) and gate_up_proj.dtype == torch.float32
            and not torch.is_autocast_enabled(device_type)
            and topk_idx_TK.shape[1] * (gate_up_proj[0].nbytes + down_proj[0].nbytes) <= ONE_TOKEN_MAX_BYTES):
        return _one_token_forward(x_TD, topk_idx_TK, topk_weight_TK, gate_up_proj, down_proj)
    order_R, token_R, counts_E = sort_by_expert(topk_idx_TK, gate_up_proj.shape[0])
    x_TD, gate_up_proj, down_proj = x_TD.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype)
    weight_R = topk_weight_TK.reshape(-1)[order_R].to(dtype)
    segments = counts_E.cumsum(0).to(torch.int32) if kernel == "grouped_mm" else counts_E.tolist()
    with torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext():
        if wants_grad:
            y_TD = _GroupedExperts.apply(x_TD, gate_up_proj, down_proj, weight_R, token_R, segments, runner)
        else:  # the same forward without autograd's bookkeeping (decode: fixed costs dominate)
            ops = _Rows(x_TD, gate_up_proj, down_proj, weight_R, token_R, segments, runner)
            if ops.grouped:
                y_TD, _ = _grouped_forward(ops, False)
            elif few_rows and len(order_R) <= FEW_ROWS and dtype == torch.float32 and not ops.quantized:
                y_TD = _few_rows_forward(ops)
            else:
                y_TD, _ = _per_expert_forward(ops, False)
    return y_TD.to(out_dtype)


class _GroupedExperts(torch.autograd.Function):
    """out_TD = sum over rows r (sorted by expert) of w_r * SwiGLU_{e(r)}(x[token_r]).

    `segments` is the int32 tensor of cumulative row counts (the grouped_mm kernel) or the list of row counts (the
    per-expert kernel, run by `runner`). Keeps the gate/up projection (R x 2F in all) for backward, against the
    R x (2D + 4F) that autograd through the plain ops would keep; backward gathers the inputs again.
    """

    @staticmethod
    def forward(ctx, x_TD, gate_up_proj, down_proj, weight_R, token_R, segments, runner):  # type: ignore[override]
        ops = _Rows(x_TD, gate_up_proj, down_proj, weight_R, token_R, segments, runner)
        y_TD, ctx.gu = (_grouped_forward if ops.grouped else _per_expert_forward)(ops, any(ctx.needs_input_grad))
        ctx.save_for_backward(x_TD, gate_up_proj, down_proj, weight_R, token_R)
        ctx.segments, ctx.runner = segments, runner
        return y_TD

    @staticmethod
    def backward(ctx, grad_TD):  # type: ignore[override]
        ops = _Rows(*ctx.saved_tensors, ctx.segments, ctx.runner)
        grads = _grouped_backward if ops.grouped else _per_expert_backward
        d_x_TD, d_gate_up, d_down, d_weight_R = grads(ops, grad_TD.contiguous(), ctx.gu)
        return d_x_TD, d_gate_up, d_down, d_weight_R, None, None, None


class _Rows(NamedTuple):
    x_TD: torch.Tensor
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    weight_R: torch.Tensor
    token_R: torch.Tensor
    segments: torch.Tensor | list[int]
    runner: SegmentRunner

    @property
    def grouped(self) -> bool:
        return isinstance(self.segments, torch.Tensor)

    @property
    def quantized(self) -> bool:
        return isinstance(self.gate_up_proj, QuantizedWeight)


def _combine(rows_RD: torch.Tensor, token_R: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Add the rows (sorted by expert) into their tokens: (T, D)."""
    return rows_RD.new_zeros(num_tokens, rows_RD.shape[1]).index_add_(0, token_R, rows_RD)


def _silu_mul(gu_N2F: torch.Tensor) -> torch.Tensor:
    gate_NF, up_NF = gu_N2F.chunk(2, dim=-1)
    return F.silu(gate_NF).mul_(up_NF)


def _swiglu_grad(gu_N2F: torch.Tensor, dh_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = silu(g) * u, d h / d[g, u] for the upstream gradient dh as one (N, 2F) tensor)."""
    gate_NF, up_NF = gu_N2F.chunk(2, dim=-1)
    silu_NF = F.silu(gate_NF)
    d_gu_N2F = torch.empty_like(gu_N2F)
    d_gate_NF, d_up_NF = d_gu_N2F.chunk(2, dim=-1)
    torch.mul(dh_NF, silu_NF, out=d_up_NF)
    torch.ops.aten.silu_backward.grad_input(dh_NF * up_NF, gate_NF, grad_input=d_gate_NF)
    return silu_NF.mul_(up_NF), d_gu_N2F


# ---------------------------------------------------------------------------------------- grouped_mm kernel
def _grouped_forward(ops: _Rows, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y_TD, the (R, 2F) gate/up projection where `keep`)."""
    offs = ops.segments
    gu_R2F = F.grouped_mm(ops.x_TD.index_select(0, ops.token_R), ops.gate_up_proj.transpose(1, 2), offs=offs)
    hw_RF = _silu_mul(gu_R2F).mul_(ops.weight_R.unsqueeze(-1))
    y_RD = F.grouped_mm(hw_RF, ops.down_proj.transpose(1, 2), offs=offs)
    return _combine(y_RD, ops.token_R, ops.x_TD.shape[0]), gu_R2F if keep else None


def _grouped_backward(ops: _Rows, grad_TD: torch.Tensor, gu_R2F: torch.Tensor):
    offs, w_R1 = ops.segments, ops.weight_R.unsqueeze(-1)
    grad_RD = grad_TD.index_select(0, ops.token_R)
    dh_RF = F.grouped_mm(grad_RD, ops.down_proj, offs=offs)  # gradient of w * h
    h_RF, d_gu_R2F = _swiglu_grad(gu_R2F, dh_RF.mul(w_R1))
    d_weight_R = dh_RF.mul_(h_RF).sum(-1)
    del dh_RF
    d_down = F.grouped_mm(grad_RD.t(), h_RF.mul_(w_R1), offs=offs)  # (E, D, F)
    del grad_RD, h_RF
    d_gate_up = F.grouped_mm(d_gu_R2F.t(), ops.x_TD.index_select(0, ops.token_R), offs=offs)  # (E, 2F, D)
    d_x_RD = F.grouped_mm(d_gu_R2F, ops.gate_up_proj, offs=offs)
    return _combine(d_x_RD, ops.token_R, ops.x_TD.shape[0]), d_gate_up, d_down, d_weight_R


# ---------------------------------------------------------------------------------------- per-expert kernel
def _bounds(counts: list[int]) -> dict[int, tuple[int, int]]:
    """expert -> (first row, end row), for every expert with rows."""
    ends = itertools.accumulate(counts)
    return {e: (end - n, end) for e, (n, end) in enumerate(zip(counts, ends)) if n}


def _per_expert_forward(ops: _Rows, keep: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
    """(y_TD, each expert's gate/up projection where `keep`). Each expert's rows go through plain matmuls (without
    `keep`, the runner's `linear`, which may pick a faster operand order for a few rows); a chunk's outputs are
    added into y_TD by its commit. No (R, D) temporaries: on CPU a fresh buffer that large costs a page fault per
    4 KB on first touch (13 ms for S1's 50 MB)."""
    y_TD, bounds = torch.zeros_like(ops.x_TD), _bounds(ops.segments)
    gus: dict[int, torch.Tensor] | None = {} if keep else None
    linear = F.linear if keep else ops.runner.linear

    def chunk(experts: list[int]) -> Commit:
        outs = []
        for e in experts:
            s, t = bounds[e]
            tok_N = ops.token_R[s:t]
            gu_N2F = linear(ops.x_TD.index_select(0, tok_N), ops.gate_up_proj[e])
            if gus is not None:
                gus[e] = gu_N2F
            h_NF = _silu_mul(gu_N2F).mul_(ops.weight_R[s:t, None])
            outs.append((tok_N, linear(h_NF, ops.down_proj[e])))
        return lambda: [y_TD.index_add_(0, tok_N, y_ND) for tok_N, y_ND in outs]

    ops.runner.run(chunk, list(bounds), [t - s for s, t in bounds.values()])
    return y_TD, gus


FEW_ROWS = 128
"""Without gradients, calls of at most this many (token, slot) rows run `_few_rows_forward` (decode: 8 rows of 7
experts are 56); more rows keep `_per_expert_forward`, which holds no buffer for all rows at once."""


def _few_rows_forward(ops: _Rows) -> torch.Tensor:
    """y_TD as `_per_expert_forward` computes it, for a few fp32 rows without autograd: each expert's two matmuls
    write into (R, 2F) and (R, D) buffers shared by all experts; SwiGLU and the gate weights run once per chunk of
    experts (once in all in the calling thread) and the combine once. A chunk writes only its own rows."""
    bounds = _bounds(ops.segments)
    x_RD = ops.x_TD.index_select(0, ops.token_R)
    gu_R2F = x_RD.new_empty(x_RD.shape[0], ops.gate_up_proj.shape[1])
    y_RD = torch.empty_like(x_RD)
    experts, rows = list(bounds), [t - s for s, t in bounds.values()]
    position = {e: i for i, e in enumerate(experts)}
    gate_up_ID, down_FD = ops.gate_up_proj.transpose(1, 2), ops.down_proj.transpose(1, 2)  # (E, D, 2F), (E, F, D)
    x_parts, gu_parts, y_parts = x_RD.split(rows), gu_R2F.split(rows), y_RD.split(rows)

    def chunk(chosen: list[int]) -> Commit:
        i, j = position[chosen[0]], position[chosen[-1]] + 1
        for e, x_ND, gu_N2F in zip(chosen, x_parts[i:j], gu_parts[i:j]):
            torch.mm(x_ND, gate_up_ID[e], out=gu_N2F)
        first, last = bounds[chosen[0]][0], bounds[chosen[-1]][1]
        h_NF = _silu_mul(gu_R2F[first:last]).mul_(ops.weight_R[first:last, None])
        for e, h_part, y_ND in zip(chosen, h_NF.split(rows[i:j]), y_parts[i:j]):
            torch.mm(h_part, down_FD[e], out=y_ND)
        return _nothing

    if ops.runner.parallel(rows):
        ops.runner.run(chunk, experts, rows)
    else:
        chunk(experts)
    return _combine(y_RD, ops.token_R, ops.x_TD.shape[0])


ONE_TOKEN_MAX_BYTES = 4 << 20
"""Without gradients, one fp32 token whose K experts' weights are at most this large in all takes
`_one_token_forward` (tiny: 7 x 129 KB); larger ones keep the per-expert kernel, which reads them in place."""


def _one_token_forward(x_1D: torch.Tensor, idx_1K: torch.Tensor, weight_1K: torch.Tensor,
                       gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """y (1, D) = sum_k w_k SwiGLU_{idx_k}(x) for one token: its K experts' weights gathered into (K, 2F, D) and
    (K, D, F) copies and two batched matmuls (x @ W^T per expert), a dozen ops in all instead of the sort, the
    segments and 2K matmuls. The same function as the per-expert form; the sum over k is bmm's and sum's, so the
    last bits may differ (tests/test_decode_paths.py)."""
    idx_K = idx_1K[0]
    k = idx_K.shape[0]
    gu_K12F = torch.bmm(x_1D.expand(k, -1)[:, None], gate_up_proj.index_select(0, idx_K).transpose(1, 2))
    h_K1F = _silu_mul(gu_K12F).mul_(weight_1K.view(k, 1, 1))
    return torch.bmm(h_K1F, down_proj.index_select(0, idx_K).transpose(1, 2)).sum(0)


def _nothing() -> None:
    """The commit of a chunk that wrote only its own rows."""


def _per_expert_backward(ops: _Rows, grad_TD: torch.Tensor, gus: dict[int, torch.Tensor]):
    x_TD, bounds = ops.x_TD, _bounds(ops.segments)
    d_gate_up, d_down = torch.empty_like(ops.gate_up_proj), torch.empty_like(ops.down_proj)
    for e in set(range(d_gate_up.shape[0])) - set(bounds):  # experts without rows; the others are overwritten
        d_gate_up[e].zero_()
        d_down[e].zero_()
    d_x_TD, d_weight_R = torch.zeros_like(x_TD), torch.empty_like(ops.weight_R)

    def chunk(experts: list[int]) -> Commit:
        outs = []
        for e in experts:
            s, t = bounds[e]
            tok_N, w_N1 = ops.token_R[s:t], ops.weight_R[s:t, None]
            grad_ND = grad_TD.index_select(0, tok_N)
            dh_NF = torch.mm(grad_ND, ops.down_proj[e])  # gradient of w * h
            h_NF, d_gu_N2F = _swiglu_grad(gus[e], dh_NF.mul(w_N1))
            torch.sum(dh_NF.mul_(h_NF), dim=-1, out=d_weight_R[s:t])
            torch.mm(grad_ND.t(), h_NF.mul_(w_N1), out=d_down[e])
            torch.mm(d_gu_N2F.t(), x_TD.index_select(0, tok_N), out=d_gate_up[e])
            outs.append((tok_N, torch.mm(d_gu_N2F, ops.gate_up_proj[e])))
        return lambda: [d_x_TD.index_add_(0, tok_N, d_x_ND) for tok_N, d_x_ND in outs]

    ops.runner.run(chunk, list(bounds), [t - s for s, t in bounds.values()])
    return d_x_TD, d_gate_up, d_down, d_weight_R
