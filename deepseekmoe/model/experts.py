"""Routed experts with stacked weights, and several implementations of one interface.

Shape legend: T tokens, D hidden, E routed experts, K experts per token, F expert hidden, R = T*K rows
(one row per (token, slot) pair), N / M the output / inner width of a matrix multiply.

Weights (HF-transformers v5 layout, nn.Linear convention out x in):
    gate_up_proj (E, 2F, D)  rows [0, F) are gate_proj, rows [F, 2F) are up_proj
    down_proj    (E, D, F)

Implementations (`config.experts_impl` picks "loop" or "grouped"; "grouped" chooses a strategy per call with
`choose_strategy`, and `RoutedExperts.strategy` can pin one of STRATEGIES):
  * "loop"        the readable reference: for each expert, gather its tokens, run SwiGLU, scatter-add. Test oracle.
  * "slices"      dropless sorted dispatch in one autograd Function (`_SlicedSwiGLU`): stable-sort the R rows by
                  expert; for each non-empty expert gather its rows, run the fused gate/up matmul, SwiGLU, scale by
                  the gates, down matmul, scatter-add into the output. Backward is hand-written: weight gradients
                  are written straight into (E, ...) buffers (autograd through `weight[e]` would zero-fill a full
                  (E, 2F, D) tensor per expert), the gate weights scale h before down_proj so d(gate) = <dh, h>,
                  and h = silu(g) * u is recomputed from the saved gate/up projection. One host sync (the counts).
                  On CPU the experts run on single-threaded workers that take chunks of experts as they go; a
                  chunk of experts with few rows each runs as grouped GEMMs over its expert range.
  * "grouped_mm"  the same function (`_GroupedSwiGLU`), each matmul one `torch.nn.functional.grouped_mm` over
                  the per-expert row offsets: no host sync, no Python loop, but R-row temporaries. Needs 16-byte
                  aligned strides (`grouped_mm_supported`). The choice on accelerators.
  * "bmm"         batched matmul over a copy of each row's expert weights: no sort, no host sync; only for a
                  handful of rows (decode), since it copies R weight matrices.
  * "rows"        decode without autograd (with gradients it runs as "slices"): only the experts that got rows,
                  each as two plain matmuls in the operand order fastest for its row count (weight-major W @ x^T
                  for 1-7 rows), in the calling thread, or on the CPU workers where the weights to stream are
                  large (the shared experts then run there too, as one more chunk).
The shared experts are added by `experts_forward(..., shared=)`, after the routed ones or, for "rows" on the
workers, beside them.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import cpu_workers
from .experts_rows import _parameters, _sum, rows_forward

STRATEGIES = ("loop", "grouped_mm", "slices", "bmm", "rows")


class RoutedExperts(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.n_routed_experts is not None
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, d, f
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self.impl = config.experts_impl
        self.strategy: str | None = None
        """Pin one of STRATEGIES (benchmarks, tests); None lets "grouped" choose per call."""

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                shared: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Routed experts' output, plus shared(x_TD) where given (see experts_forward)."""
        strategy = "loop" if self.impl == "loop" else self.strategy
        return experts_forward(x_TD, topk_idx_TK, topk_weight_TK, self.gate_up_proj, self.down_proj, strategy,
                               shared)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, impl={self.impl}, strategy={self.strategy or 'auto'}"


def experts_forward(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, strategy: str | None = None,
                    shared: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """y_t = sum_k w_{t,k} * FFN_{idx_{t,k}}(x_t) with the named strategy (None: `choose_strategy`), plus
    shared(x) where given (the shared experts: "rows" runs them on the CPU workers beside the routed experts
    where it hands those to the workers; every other strategy adds them in place afterwards)."""
    if x_TD.shape[0] == 0:
        return torch.zeros_like(x_TD) if shared is None else shared(x_TD)
    needs_grad = _needs_grad(x_TD, topk_weight_TK, gate_up_proj, down_proj)
    strategy = strategy or choose_strategy(x_TD, topk_idx_TK, gate_up_proj, down_proj, needs_grad)
    if strategy == "rows" and not needs_grad and not _needs_grad(x_TD, *_parameters(shared)):
        return experts_sorted(x_TD, topk_idx_TK, topk_weight_TK, gate_up_proj, down_proj, strategy, shared)
    y_TD = _routed(x_TD, topk_idx_TK, topk_weight_TK, gate_up_proj, down_proj, strategy, needs_grad)
    return y_TD if shared is None else y_TD.add_(shared(x_TD))  # in place: y_TD is a fresh tensor


def _routed(x_TD, topk_idx_TK, topk_weight_TK, gate_up_proj, down_proj, strategy: str, needs_grad: bool):
    if strategy == "loop":
        return experts_loop(x_TD, topk_idx_TK, topk_weight_TK, gate_up_proj, down_proj)
    if strategy == "bmm":
        return experts_bmm(x_TD, topk_idx_TK, topk_weight_TK, gate_up_proj, down_proj)
    if strategy == "rows" and needs_grad:  # rows has no backward: the per-expert autograd Function instead
        strategy = "slices"
    if strategy == "grouped_mm" and not grouped_mm_supported(x_TD, gate_up_proj, down_proj):
        strategy = "slices"
    if strategy in ("rows", "grouped_mm", "slices"):
        return experts_sorted(x_TD, topk_idx_TK, topk_weight_TK, gate_up_proj, down_proj, strategy, None)
    raise ValueError(f"unknown experts strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def choose_strategy(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor, needs_grad: bool = True) -> str:
    """The fastest correct strategy for this call, as measured (benchmarks/README.md). On accelerators
    "grouped_mm" wherever its operands qualify. On CPU without gradients: "rows" for up to ROWS_MAX_PER_EXPERT
    rows per expert (decode), "grouped_mm" up to NO_GRAD_SLICES_MIN_ROWS (one C++ loop over the experts, each
    matmul multi-threaded), "slices" above. On CPU with gradients: "grouped_mm" below PARALLEL_MIN_ROWS,
    "slices" above (experts in parallel on the CPU workers, hand-written backward). "slices" wherever grouped_mm
    does not accept the operands (strides that are not 16-byte multiples)."""
    rows = topk_idx_TK.numel()
    cpu = x_TD.device.type == "cpu"
    if cpu and not needs_grad and rows <= ROWS_MAX_PER_EXPERT * gate_up_proj.shape[0]:
        return "rows"
    if not grouped_mm_supported(x_TD, gate_up_proj, down_proj):
        return "slices"
    if not cpu:
        return "grouped_mm"
    return "grouped_mm" if rows < (PARALLEL_MIN_ROWS if needs_grad else NO_GRAD_SLICES_MIN_ROWS) else "slices"


PARALLEL_MIN_ROWS = 64
"""On CPU with gradients, below this many rows (tokens x K) one grouped GEMM beats splitting the experts over the
workers."""
ROWS_MAX_PER_EXPERT = 4
"""On CPU without gradients, "rows" up to this many rows per expert on average (decode: S1 shape up to ~40 tokens;
at 64 tokens grouped_mm is ahead)..."""
NO_GRAD_SLICES_MIN_ROWS = 6144
"""... then "grouped_mm" below this many rows, "slices" from here (tie at 1,024 tokens x 6, slices 0.7x at 4,096)."""


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


def experts_bmm(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """One batched matmul over the R rows, each with a copy of its expert's weights (decode-sized R only)."""
    t, k = topk_idx_TK.shape
    idx_R = topk_idx_TK.reshape(-1)
    x_R1D = x_TD.unsqueeze(1).expand(t, k, x_TD.shape[1]).reshape(t * k, 1, -1)
    gate_R1F, up_R1F = torch.bmm(x_R1D, gate_up_proj[idx_R].transpose(1, 2)).chunk(2, dim=-1)
    y_R1D = torch.bmm(F.silu(gate_R1F) * up_R1F, down_proj[idx_R].transpose(1, 2))
    y_TKD = y_R1D.view(t, k, -1) * topk_weight_TK.unsqueeze(-1).to(y_R1D.dtype)
    return y_TKD.sum(dim=1)


# ---------------------------------------------------------------------------------------- sorted dispatch
def grouped_mm_supported(x_TD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """torch's grouped_mm exists and accepts these operands: every stride a multiple of 16 bytes (CPU and CUDA
    kernels both require it), and on CUDA bf16 operands (the fp32 path is a slow fallback)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x_TD.device.type == "cuda" and x_TD.dtype != torch.bfloat16:
        return False
    if x_TD.dtype != gate_up_proj.dtype or x_TD.dtype != down_proj.dtype:
        return False
    align = 16 // x_TD.element_size()
    d, f = down_proj.shape[1], down_proj.shape[2]
    return (d % align == 0 and f % align == 0 and gate_up_proj.data_ptr() % 16 == 0
            and down_proj.data_ptr() % 16 == 0)


def experts_sorted(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                   gate_up_proj: torch.Tensor, down_proj: torch.Tensor, strategy: str,
                   shared: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Dropless sorted dispatch: rows sorted by expert, per-expert (or grouped) GEMMs, scatter-add to tokens.
    strategy: "rows" (no autograd; adds shared(x) where given), "grouped_mm" (operands supported) or "slices"."""
    k = topk_idx_TK.shape[1]
    flat_idx_R = topk_idx_TK.reshape(-1)
    order_R = torch.argsort(flat_idx_R, stable=True)
    counts_E = torch.bincount(flat_idx_R, minlength=gate_up_proj.shape[0])
    token_R = order_R // k  # with order_R: rows sorted by expert -> (token, slot)
    device_type, out_dtype = x_TD.device.type, x_TD.dtype
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:  # the Function's matmuls run in the autocast dtype, explicitly
        dtype = torch.get_autocast_dtype(device_type)
        x_TD, gate_up_proj, down_proj = x_TD.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype)
    weight_R = topk_weight_TK.reshape(-1)[order_R].to(x_TD.dtype)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if strategy == "rows":
            y_TD = rows_forward(x_TD, gate_up_proj, down_proj, weight_R, token_R, counts_E.tolist(), shared)
        elif strategy == "grouped_mm" and device_type == "cpu" and not _needs_grad(x_TD, gate_up_proj, down_proj,
                                                                                    weight_R):
            y_TD = _grouped_swiglu_no_grad(x_TD, gate_up_proj, down_proj, weight_R, token_R,
                                           counts_E.cumsum(0).to(torch.int32))
        elif strategy == "grouped_mm":
            offsets_E = counts_E.cumsum(0).to(torch.int32)
            unsort_R = torch.empty_like(order_R).index_copy_(0, order_R, torch.arange(len(order_R), device=x_TD.device))
            y_TD = _GroupedSwiGLU.apply(x_TD, gate_up_proj, down_proj, weight_R, token_R, offsets_E, unsort_R)
        else:
            y_TD = _SlicedSwiGLU.apply(x_TD, gate_up_proj, down_proj, weight_R, token_R, counts_E.tolist())
    return y_TD.to(out_dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _grouped_swiglu_rows(x_TD, gate_up_proj, down_proj, weight_R, token_R, offsets_E):
    """Rows sorted by expert through two grouped GEMMs: (gate/up projection (R, 2F), w * SwiGLU output (R, D)).
    offsets_E are the cumulative row counts of the experts of gate_up_proj / down_proj."""
    gu_R2F = F.grouped_mm(x_TD.index_select(0, token_R), gate_up_proj.transpose(1, 2), offs=offsets_E)
    hw_RF = _silu_mul(gu_R2F).mul_(weight_R.unsqueeze(-1))
    return gu_R2F, F.grouped_mm(hw_RF, down_proj.transpose(1, 2), offs=offsets_E)


def _grouped_swiglu_no_grad(x_TD, gate_up_proj, down_proj, weight_R, token_R, offsets_E) -> torch.Tensor:
    """_GroupedSwiGLU's forward without autograd bookkeeping or the inverse permutation (decode: fixed costs
    dominate); rows are summed into their tokens by index_add_ (CPU only: on GPUs that would not be deterministic)."""
    _, y_RD = _grouped_swiglu_rows(x_TD, gate_up_proj, down_proj, weight_R, token_R, offsets_E)
    return torch.zeros_like(x_TD).index_add_(0, token_R, y_RD)


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


class _SlicedSwiGLU(torch.autograd.Function):
    """out_TD = sum over rows r (sorted by expert) of w_r * SwiGLU_{e(r)}(x[token_r]), one expert at a time.

    Every temporary is one expert's (rows x width): on CPU a fresh tensor above glibc's mmap threshold (32 MB)
    costs a page fault per 4 KB on first touch, which made the R x D gathers of the grouped form expensive.
    Keeps each expert's gate/up projection for backward (R x 2F in all, against the R x (2D + 4F) that autograd
    through the plain ops would keep); backward gathers the inputs again and recomputes the SwiGLU.
    With several CPU threads the experts are cut into contiguous chunks of about equal row counts, a few per
    single-threaded worker, and the workers take the next chunk as they finish one (`cpu_workers.run_chunks`):
    experts run in parallel instead of each small op forking and joining, and a worker slowed down by the machine
    does less.
    """

    @staticmethod
    def forward(ctx, x_TD, gate_up_proj, down_proj, weight_R, token_R, counts):  # type: ignore[override]
        groups = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, itertools.accumulate(counts))) if n]
        workers = _num_workers(x_TD, token_R.shape[0], _weight_bytes(groups, gate_up_proj, down_proj))
        chunks = _split(groups, workers * _chunks_per_worker(groups))
        keep = any(ctx.needs_input_grad)  # nothing to keep for backward under no_grad
        ops = _Operands.of(x_TD, gate_up_proj, down_proj, weight_R, token_R, counts)
        outs = [torch.zeros_like(x_TD) for _ in range(max(1, workers))]
        saved = cpu_workers.run_chunks(_forward_chunk, chunks, outs, workers, ops, keep)
        ctx.save_for_backward(x_TD, gate_up_proj, down_proj, weight_R, token_R)
        ctx.chunks, ctx.saved, ctx.workers, ctx.counts = chunks, saved, workers, counts
        return _sum(outs)

    @staticmethod
    def backward(ctx, grad_TD):  # type: ignore[override]
        x_TD, gate_up_proj, down_proj, weight_R, token_R = ctx.saved_tensors
        ops = _Operands.of(x_TD, gate_up_proj, down_proj, weight_R, token_R, ctx.counts)
        used = [g for chunk in ctx.chunks for g in chunk]
        d_gate_up, d_down = _zero_unused(torch.empty_like(gate_up_proj), torch.empty_like(down_proj), used)
        d_weight_R = torch.empty_like(weight_R)
        grads = (grad_TD.contiguous(), d_gate_up.unbind(0), d_down.unbind(0), d_weight_R.split(ctx.counts))
        chunks = [list(zip(chunk, saved)) for chunk, saved in zip(ctx.chunks, ctx.saved)]
        d_x = [torch.zeros_like(x_TD) for _ in range(max(1, ctx.workers))]
        cpu_workers.run_chunks(_backward_chunk, chunks, d_x, ctx.workers, ops, grads)
        return _sum(d_x), d_gate_up, d_down, d_weight_R, None, None


class _Operands(NamedTuple):
    """One call's operands and their per-expert views. Each tuple of views is made by one call, so the loops over
    experts issue only the ops that compute (every Python-level op takes the GIL, which the workers share)."""

    x_TD: torch.Tensor
    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    weight_R: torch.Tensor
    token_R: torch.Tensor
    tokens: tuple[torch.Tensor, ...]
    """token_R split per expert."""
    weights: tuple[torch.Tensor, ...]
    """weight_R split per expert, as (rows, 1) columns."""
    gate_ups: tuple[torch.Tensor, ...]
    """gate_up_proj[e] for every expert e."""
    downs: tuple[torch.Tensor, ...]
    """down_proj[e] for every expert e."""

    @classmethod
    def of(cls, x_TD, gate_up_proj, down_proj, weight_R, token_R, counts: list[int]) -> "_Operands":
        return cls(x_TD, gate_up_proj, down_proj, weight_R, token_R, token_R.split(counts),
                   weight_R.unsqueeze(-1).split(counts), gate_up_proj.unbind(0), down_proj.unbind(0))


def _forward_chunk(groups, out_TD, ops: _Operands, keep):
    if _grouped_chunk(groups, ops.x_TD, ops.gate_up_proj, ops.down_proj):
        return _forward_chunk_grouped(groups, out_TD, ops, keep)
    saved = []
    for e, _, _ in groups:
        tok_N = ops.tokens[e]
        gu_N2F = F.linear(ops.x_TD.index_select(0, tok_N), ops.gate_ups[e])
        out_TD.index_add_(0, tok_N, F.linear(_silu_mul(gu_N2F).mul_(ops.weights[e]), ops.downs[e]))
        if keep:
            saved.append(gu_N2F)
    return saved


GROUPED_CHUNK_MAX_ROWS_PER_EXPERT = 16
"""A chunk whose experts average fewer rows than this runs as two grouped GEMMs (one C++ loop over its experts)
instead of a Python loop of per-expert ops, whose fixed cost would dominate (decode)."""


def _few_rows(groups: list) -> bool:
    """The groups' experts average fewer than GROUPED_CHUNK_MAX_ROWS_PER_EXPERT rows."""
    return bool(groups) and groups[-1][2] - groups[0][1] < GROUPED_CHUNK_MAX_ROWS_PER_EXPERT * len(groups)


def _grouped_chunk(groups, x_TD, gate_up_proj, down_proj) -> bool:
    return _few_rows(groups) and grouped_mm_supported(x_TD, gate_up_proj, down_proj)


def _forward_chunk_grouped(groups, out_TD, ops: _Operands, keep):
    """The chunk's experts e0..e1 in one grouped GEMM per projection; saves per-expert views of the gate/up
    projection, so backward is the per-expert one."""
    (e0, r0, _), (e1, _, r1) = groups[0], groups[-1]
    ends = dict((e, t - r0) for e, _, t in groups)
    offsets, last = [], 0
    for e in range(e0, e1 + 1):
        last = ends.get(e, last)
        offsets.append(last)
    offs = torch.tensor(offsets, dtype=torch.int32, device=ops.x_TD.device)
    tok_N = ops.token_R[r0:r1]
    gu_N2F, y_ND = _grouped_swiglu_rows(ops.x_TD, ops.gate_up_proj[e0:e1 + 1], ops.down_proj[e0:e1 + 1],
                                        ops.weight_R[r0:r1], tok_N, offs)
    out_TD.index_add_(0, tok_N, y_ND)
    return [gu_N2F[s - r0:t - r0] for _, s, t in groups] if keep else []


def _backward_chunk(groups_saved, d_x_TD, ops: _Operands, grads):
    grad_TD, d_gate_ups, d_downs, d_weights = grads
    for (e, _, _), gu_N2F in groups_saved:
        tok_N, w_N1 = ops.tokens[e], ops.weights[e]
        grad_ND = grad_TD.index_select(0, tok_N)
        dh_NF = torch.mm(grad_ND, ops.downs[e])  # gradient of w * h
        h_NF, d_gu_N2F = _swiglu_grad(gu_N2F, dh_NF.mul(w_N1))
        torch.sum(dh_NF.mul_(h_NF), dim=-1, out=d_weights[e])
        torch.mm(grad_ND.t(), h_NF.mul_(w_N1), out=d_downs[e])
        torch.mm(d_gu_N2F.t(), ops.x_TD.index_select(0, tok_N), out=d_gate_ups[e])
        d_x_TD.index_add_(0, tok_N, torch.mm(d_gu_N2F, ops.gate_ups[e]))


MIN_ROWS_PER_WORKER = 512
"""Rows per CPU worker below which fewer workers are used (threads cost more than they give)..."""
MIN_WEIGHT_BYTES_PER_WORKER = 2 << 20
"""... unless each worker has at least this many bytes of expert weights to read."""
CHUNKS_PER_WORKER = 16
"""Chunks of experts per worker where experts get many rows: enough that a worker finishing early waits at most a
small share of the work for the other (the machine may slow either down)..."""
GROUPED_CHUNKS_PER_WORKER = 2
"""... and where they get few rows (decode: grouped GEMMs over several experts per chunk pay fewer fixed costs)."""


def _chunks_per_worker(groups: list) -> int:
    return GROUPED_CHUNKS_PER_WORKER if _few_rows(groups) else CHUNKS_PER_WORKER


def _num_workers(x_TD: torch.Tensor, num_rows: int, weight_bytes: int) -> int:
    """CPU workers to run the experts on: 0 runs them in the calling thread (accelerators, one CPU thread).
    One per intra-op thread where there are enough rows to compute or enough expert weights to stream (decode is
    bound by reading the weights of the chosen experts: two cores read faster than one)."""
    if x_TD.device.type != "cpu" or torch.get_num_threads() == 1:
        return 0
    work = max(num_rows // MIN_ROWS_PER_WORKER, weight_bytes // MIN_WEIGHT_BYTES_PER_WORKER)
    return max(1, min(torch.get_num_threads(), work))


def _weight_bytes(groups: list, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> int:
    """Bytes of expert weights the groups read."""
    return len(groups) * (gate_up_proj[0].numel() + down_proj[0].numel()) * gate_up_proj.element_size()


def _split(groups: list, parts: int) -> list[list]:
    """Contiguous runs of groups with about equal row counts (at most max(parts, 1) runs, none empty)."""
    if parts <= 1 or len(groups) <= 1:
        return [groups]
    total = groups[-1][2] - groups[0][1]
    runs: list[list] = [[]]
    for g in groups:
        if runs[-1] and g[1] - groups[0][1] >= total * len(runs) / parts:
            runs.append([])
        runs[-1].append(g)
    return runs


def _zero_unused(d_gate_up: torch.Tensor, d_down: torch.Tensor, groups: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weight gradients of experts that got no rows (the others are fully overwritten)."""
    used = {g[0] for g in groups}
    for e in range(d_gate_up.shape[0]):
        if e not in used:
            d_gate_up[e].zero_()
            d_down[e].zero_()
    return d_gate_up, d_down


class _GroupedSwiGLU(torch.autograd.Function):
    """The same function as _SlicedSwiGLU, each matrix multiply one grouped GEMM over all experts (offsets_E are
    the cumulative row counts). No host sync; R-row temporaries, which suit an accelerator's caching allocator.
    Rows go back to (token, slot) order through the inverse permutation unsort_R and are summed over the K slots:
    no scatter-add, so the result is deterministic on GPUs too."""

    @staticmethod
    def forward(ctx, x_TD, gate_up_proj, down_proj, weight_R, token_R, offsets_E, unsort_R):  # type: ignore[override]
        gu_R2F, y_RD = _grouped_swiglu_rows(x_TD, gate_up_proj, down_proj, weight_R, token_R, offsets_E)
        ctx.save_for_backward(x_TD, gate_up_proj, down_proj, weight_R, token_R, offsets_E, unsort_R, gu_R2F)
        return _unsort_sum(y_RD, unsort_R, x_TD.shape[0])

    @staticmethod
    def backward(ctx, grad_TD):  # type: ignore[override]
        x_TD, gate_up_proj, down_proj, weight_R, token_R, offsets_E, unsort_R, gu_R2F = ctx.saved_tensors
        grad_RD = grad_TD.contiguous().index_select(0, token_R)
        dh_RF = F.grouped_mm(grad_RD, down_proj, offs=offsets_E)  # gradient of w * h
        h_RF, d_gu_R2F = _swiglu_grad(gu_R2F, dh_RF.mul(weight_R.unsqueeze(-1)))
        d_weight_R = dh_RF.mul_(h_RF).sum(-1)
        del dh_RF
        d_down = F.grouped_mm(grad_RD.t(), h_RF.mul_(weight_R.unsqueeze(-1)), offs=offsets_E)  # (E, D, F)
        del grad_RD, h_RF
        d_gate_up = F.grouped_mm(d_gu_R2F.t(), x_TD.index_select(0, token_R), offs=offsets_E)  # (E, 2F, D)
        d_x_RD = F.grouped_mm(d_gu_R2F, gate_up_proj, offs=offsets_E)
        return _unsort_sum(d_x_RD, unsort_R, x_TD.shape[0]), d_gate_up, d_down, d_weight_R, None, None, None


def _unsort_sum(rows_RD: torch.Tensor, unsort_R: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Rows in expert order -> (token, slot) order -> sum over the K slots of each token: (T, D)."""
    return rows_RD.index_select(0, unsort_R).view(num_tokens, -1, rows_RD.shape[1]).sum(1)
