"""Linear layers whose large matmuls are cut into parts that the CPU runtime's workers take as they finish one.

With the calling thread at one intra-op thread (cpu.py), a large matmul would use one core; here it is cut into
contiguous row blocks (`PARTS_PER_WORKER` per worker) and the single-threaded workers take the next block as they
finish one, so both cores work and a worker that the machine slows down simply takes fewer blocks. No block sums
into another's output (the reduction dimension is never cut), and the blocks depend only on the shapes and the
worker count, so the result has the same bits whichever worker ran what:

    forward   y[rows]     = x[rows] @ W^T
    backward  dx[rows]    = dy[rows] @ W
              dW[outputs] = dy[:, outputs]^T @ x
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..model.quantized import QuantizedWeight, quantized_linear


class Runner(Protocol):
    """What the row blocks need of the CPU runtime (cpu.CpuRuntime)."""

    workers: int
    min_linear_work: int

    def run_parts(self, parts: list[Callable[[], None]]) -> None: ...

    def in_worker(self) -> bool: ...


WEIGHT_MAJOR_MAX_ROWS = 7
"""`linear_rows`: up to this many rows x @ W^T runs weight-major, as W @ x^T, in bf16 and fp16: MKL's kernel for
that operand order is faster for 1-7 rows on the CPU measured (0.55-0.77x the time at one intra-op thread, the
calling thread's count under the runtime; 2-3x at two threads: benchmarks/README.md); in fp32 at one thread it is
slower (1.3-5x for 1-4 rows), so fp32 runs x @ W^T..."""
WEIGHT_MAJOR_DTYPES = (torch.bfloat16, torch.float16)
"""The dtypes `linear_rows` runs weight-major."""
PAD_ONE_ROW_MAX_BYTES = 1 << 20
"""... and a single row is doubled to run that way where W is at most this large (0.6x the time of a GEMV for a
512 KB matrix; 1.4-1.6x for a 23 MB one, where the GEMV wins)."""


def linear_rows(x_NI: torch.Tensor, weight_OI: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x @ W^T for a handful of rows (decode), without autograd, in the operand order that is fastest for the row
    count and dtype; other sizes are plain F.linear; a quantized W runs its own kernel. The result may be a transposed view."""
    if isinstance(weight_OI, QuantizedWeight):
        return quantized_linear(x_NI, weight_OI)
    if weight_OI.dtype not in WEIGHT_MAJOR_DTYPES:
        return F.linear(x_NI, weight_OI)
    n = x_NI.shape[0]
    if n == 1 and weight_OI.nbytes <= PAD_ONE_ROW_MAX_BYTES:
        return torch.mm(weight_OI, x_NI.expand(2, -1).contiguous().t())[:, :1].t()
    if 2 <= n <= WEIGHT_MAJOR_MAX_ROWS:
        return torch.mm(weight_OI, x_NI.contiguous().t()).t()  # B must be the transpose of a contiguous x
    return F.linear(x_NI, weight_OI)


PARTS_PER_WORKER = 4
"""Row blocks per worker: a worker finishing early waits for at most about a quarter of its share."""


def blocks(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of at most `parts` contiguous, nearly equal, non-empty blocks of range(n)."""
    parts = max(1, min(parts, n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def split(items: list, weights: list[int], parts: int) -> list[list]:
    """Contiguous runs of items with about equal total weights (at most `parts` runs, none empty): experts by
    their rows, parameters by their sizes."""
    total = sum(weights)
    runs: list[list] = [[]]
    done = 0
    for item, w in zip(items, weights):
        if runs[-1] and done >= total * len(runs) / parts:
            runs.append([])
        runs[-1].append(item)
        done += w
    return runs


def split_rows(runtime: Runner, n: int, part: Callable[[int, int], None]) -> None:
    """part(start, end) over the row blocks of range(n), on the runtime's workers."""
    runtime.run_parts([lambda a=a, b=b: part(a, b) for a, b in blocks(n, runtime.workers * PARTS_PER_WORKER)])


def linear_forward(runtime: Runner, x_NI: torch.Tensor, weight_OI: torch.Tensor) -> torch.Tensor:
    """x @ W^T, row blocks of x on the workers."""
    y_NO = x_NI.new_empty(x_NI.shape[0], weight_OI.shape[0])
    split_rows(runtime, x_NI.shape[0], lambda a, b: torch.mm(x_NI[a:b], weight_OI.t(), out=y_NO[a:b]))
    return y_NO


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, weight_OI, runtime):  # type: ignore[override]
        ctx.save_for_backward(x_NI, weight_OI)
        ctx.runtime = runtime
        return linear_forward(runtime, x_NI, weight_OI)

    @staticmethod
    def backward(ctx, grad_NO):  # type: ignore[override]
        x_NI, weight_OI = ctx.saved_tensors
        runtime, grad_NO = ctx.runtime, grad_NO.contiguous()
        d_x = d_w = None
        if ctx.needs_input_grad[0]:
            d_x = x_NI.new_empty(x_NI.shape)
            split_rows(runtime, x_NI.shape[0], lambda a, b: torch.mm(grad_NO[a:b], weight_OI, out=d_x[a:b]))
        if ctx.needs_input_grad[1]:
            d_w = weight_OI.new_empty(weight_OI.shape)
            split_rows(runtime, weight_OI.shape[0], lambda a, b: torch.mm(grad_NO[:, a:b].t(), x_NI, out=d_w[a:b]))
        return d_x, d_w, None


class WorkerLinear(nn.Linear):
    """nn.Linear (without bias) whose matmuls of at least `runtime.min_linear_work` multiply-adds run in row blocks
    on the runtime's workers (module docstring); a handful of rows without gradients run `linear_rows`; the rest
    is F.linear in the calling thread."""

    runtime: Runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_NI = x.reshape(-1, x.shape[-1])
        n, (o, i) = x_NI.shape[0], self.weight.shape
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if n * o * i >= self.runtime.min_linear_work and not self.runtime.in_worker():
            x_NI = x_NI.contiguous()
            y = (_SplitLinear.apply(x_NI, self.weight, self.runtime) if wants_grad
                 else linear_forward(self.runtime, x_NI, self.weight))
        elif not wants_grad and n <= WEIGHT_MAJOR_MAX_ROWS:
            y = linear_rows(x_NI, self.weight)
        else:
            y = F.linear(x_NI, self.weight)
        return y.reshape(*x.shape[:-1], o)
