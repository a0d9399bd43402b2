"""The CPU runtime: worker threads for a step's large work (matmuls, experts, loss, attention, optimizer), applied
to a built model.

    runtime = CpuRuntime.apply(model)   # caller at one intra-op thread; experts, large matmuls on the workers
    ...
    runtime.close()                     # or `with CpuRuntime.apply(model):`

While a runtime is applied the calling thread runs one intra-op thread (`CALLER_THREADS`): on shared cores every
OpenMP parallel region waits for its slowest, possibly descheduled, thread, and a model runs thousands of small
regions a step. What needs both cores is cut into parts that the single-threaded workers take as they finish one
(the calling thread takes parts too while it runs one intra-op thread, so as many threads work as there are
workers and one hand-off less is waited for): linear layers' matmuls of at least `MIN_LINEAR_WORK` multiply-adds
(`linear.WorkerLinear`: row blocks), the LM cross-entropy and causal self-attention over whole sequences
(`rows.py`: row blocks, blocks of sequences), an attached optimizer's step (`optim.py`: runs of parameters) and the
routed experts' calls described next. No part sums into another's output, so the result never depends on which
thread ran what; the cross-entropy's, attention's and optimizer's parts even have the bits of one call over all.

The per-expert kernel (model/experts.py) hands its experts to a runner. Where the experts have much work each
(`MIN_EXPERT_WORK`: S1-sized training) or many bytes of weights to read (`MIN_WEIGHT_BYTES`: decode of 16B-sized
experts), this one cuts them into contiguous chunks of about equal row counts and lets single-threaded worker
threads take the next chunk as they finish one: experts run in parallel instead of each op forking and joining
OpenMP threads, and a worker that the machine slows down (another process on the cores) simply takes fewer chunks.
Each chunk writes rows and weight gradients of its own experts only and its sums into the token output are
committed in expert order, so the result does not depend on which worker ran what: the same bits every time.
Smaller calls run in the calling thread.

Without gradients, a handful of rows (decode) run `linear_rows` (weight-major in bf16 and fp16), in the routed
experts and in every FeedForward (dense layers, shared experts).

Applying a runtime to a model of at most 1 GB also makes glibc's malloc keep freed memory for reuse
(`keep_freed_memory`). Nothing happens at import; the pool belongs to the runtime object and is shut down by
`close`.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import platform
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserValueError
from ..model.attention import Attention
from ..model.experts import INLINE, Commit, RoutedExperts
from ..model.layers import FeedForward
from ..model.quantized import ROW_BLOCK, QuantizedLinear, QuantizedWeight, quantized_linear
from .linear import WEIGHT_MAJOR_MAX_ROWS, WorkerLinear, linear_rows, split
from .optim import install as install_optimizer
from .rows import WorkerAttention

MIN_EXPERT_WORK = 16 << 20
"""The workers take a call whose experts average at least this much work (rows x weight bytes per expert;
S1 training, 384 rows of 768 KB experts: 302 MB, 1.08x the dense FFN on the workers against 1.18x in the calling
thread, 1.26x against 1.74x beside a competing process; the small preset's training: 268 MB; tiny's training,
228 rows of 129 KB experts: 29 MB, a 1.10x faster step since the calling thread takes chunks too). Below it the
calling thread runs the experts (a prefill's few rows per expert): benchmarks/README.md..."""
MIN_WEIGHT_BYTES = 64 << 20
"""... or whose chosen experts' weights are at least this large (decode of large experts is bound by reading
them, and two cores read faster than one; below, the hand-off costs more than it saves)."""
QUANTIZED_MIN_WEIGHT_BYTES = 4 << 20
"""A quantized model's expert calls and weight-only matmuls go to the workers from this many weight bytes on
(its calling thread keeps one intra-op thread: see `CpuRuntime.apply`)."""
MIN_LINEAR_WORK = 1 << 26
"""A linear layer's matmul of at least this many multiply-adds (rows x out x in) runs in row blocks on the
workers (`linear.WorkerLinear`); smaller ones run in the calling thread."""
CALLER_THREADS = 1
"""Intra-op threads the calling thread keeps while a runtime is applied (see `CpuRuntime.apply`); the environment
variable DEEPSEEKMOE_CALLER_THREADS sets another count (for an idle machine)."""
CHUNKS_PER_WORKER = 16
"""Chunks per worker: enough that a worker finishing early waits at most a small share of the work."""


class CpuRuntime:
    """A runner for RoutedExperts (model.experts.SegmentRunner) on `workers` single-threaded CPU threads."""

    def __init__(self, workers: int, expert_bytes: int = 0, min_expert_work: int = MIN_EXPERT_WORK,
                 min_weight_bytes: int = MIN_WEIGHT_BYTES, caller_threads: int | None = None,
                 min_linear_work: int = MIN_LINEAR_WORK) -> None:
        if workers < 1:
            raise UserValueError(f"workers={workers} must be at least 1")
        self.workers, self.expert_bytes = workers, expert_bytes
        self.min_expert_work, self.min_weight_bytes = min_expert_work, min_weight_bytes
        self.min_linear_work = min_linear_work
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._in_worker = threading.local()
        self._inline = False  # in_calling_thread
        self._executor()  # start the workers now, not in a model's forward
        self._lowered = caller_threads is not None
        _open[:] = [r for r in _open if r() is not None] + [weakref.ref(self)]
        if self._lowered:  # put back by close(), or when the runtime is dropped with its model
            lower_caller_threads(caller_threads)
            self._restore = weakref.finalize(self, restore_caller_threads)

    @classmethod
    def apply(cls, model: nn.Module, workers: int | None = None, **thresholds: int) -> "CpuRuntime":
        """A new runtime with `workers` threads (default: the intra-op thread count; `thresholds`:
        min_expert_work, min_weight_bytes, min_linear_work, caller_threads), attached to `model`.

        The calling thread goes down to `caller_threads` intra-op threads (default `CALLER_THREADS`) until `close`:
        on a machine whose cores are shared an OpenMP team waits for a descheduled thread in every parallel
        region, and a model runs thousands of small ones a step (tiny-deepseekmoe trained at 53-87 tokens/s with
        two OpenMP threads and 983-1,542 with one, at a load average of 9-12: benchmarks/README.md). The work
        that needs both cores goes to the workers instead, which take parts as they finish one: large matmuls
        (`linear.WorkerLinear`), experts with much work or many weight bytes. A model with quantized weights
        runs its experts and weight-only matmuls on the workers from QUANTIZED_MIN_WEIGHT_BYTES on."""
        experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
        expert_bytes = max((m.gate_up_proj[0].nbytes + m.down_proj[0].nbytes for m in experts), default=0)
        workers = workers or intra_op_threads()
        thresholds = {"caller_threads": caller_threads_setting(), **thresholds}
        keep_freed_memory(model)
        if any(isinstance(m, QuantizedLinear) for m in model.modules()):
            thresholds = {"min_weight_bytes": QUANTIZED_MIN_WEIGHT_BYTES, **thresholds}
        return cls(workers, expert_bytes, **thresholds).attach(model)

    def attach(self, model: nn.Module) -> "CpuRuntime":
        """Run every RoutedExperts of `model` on this runtime, its float FeedForwards with small-row matmuls and
        its quantized matmuls through `linear`."""
        for m in model.modules():
            if isinstance(m, RoutedExperts):
                m.runner = self
            elif type(m) is FeedForward and not isinstance(m.gate_proj, QuantizedLinear):
                m.__class__ = SmallRowsFeedForward
            elif isinstance(m, QuantizedLinear):
                m.matmul = self.linear
            elif type(m) is Attention:
                m.__class__, m.runtime = WorkerAttention, self
            if type(m) is nn.Linear and m.bias is None:
                m.__class__, m.runtime = WorkerLinear, self
        return self

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Run `optimizer.step()` in parts on the workers where that keeps its bits (optim.py); call it before a
        learning-rate scheduler is made. Returns whether it does."""
        return install_optimizer(self, optimizer)

    @staticmethod
    def remove(model: nn.Module) -> None:
        """Undo `apply`: experts in the calling thread, in expert order (model.experts.INLINE); plain FFNs and
        linear layers."""
        for m in model.modules():
            if isinstance(m, RoutedExperts):
                m.runner = INLINE
            elif type(m) is SmallRowsFeedForward:
                m.__class__ = FeedForward
            elif isinstance(m, QuantizedLinear):
                m.matmul = quantized_linear
            elif type(m) is WorkerAttention:
                m.__class__ = Attention
                del m.runtime
            elif type(m) is WorkerLinear:
                m.__class__ = nn.Linear
                del m.runtime

    def run(self, fn: Callable[[list[int]], Commit], experts: list[int], rows: list[int]) -> None:
        """fn over chunks of the experts on the workers, and each chunk's commit in chunk order, by whichever
        worker completes the run of finished chunks; all in the calling thread where there is too little work."""
        if not self.parallel(rows):
            INLINE.run(fn, experts, rows)
            return
        chunks = split(experts, rows, self.workers * CHUNKS_PER_WORKER)
        next_chunk = itertools.count()  # next() on a count is atomic under the GIL
        done: dict[int, Commit] = {}
        committed = [0]
        lock = threading.Lock()

        def work() -> None:
            while (i := next(next_chunk)) < len(chunks):
                commit = fn(chunks[i])
                with lock:  # commits run one at a time, in chunk order
                    done[i] = commit
                    while committed[0] in done:
                        done.pop(committed[0])()
                        committed[0] += 1
        self._share(work, len(chunks))

    def run_parts(self, parts: list[Callable[[], None]]) -> None:
        """Every part on the workers, each taking the next one as it finishes one; returns when all are done."""
        next_part = itertools.count()

        def work() -> None:
            while (i := next(next_part)) < len(parts):
                parts[i]()
        self._share(work, len(parts))

    def _share(self, work: Callable[[], None], parts: int) -> None:
        """work() in as many threads as there are workers (at most `parts`), until it returns in all of them.
        The calling thread is one of them where it runs one intra-op thread, as a worker does (then a part has
        the same bits whoever runs it, and one hand-off less is waited for); otherwise only workers run it."""
        inference = torch.is_inference_mode_enabled()
        caller_works = self._inline or (torch.get_num_threads() == 1 and not self.in_worker())

        def as_worker() -> None:
            was = self.in_worker()
            self._in_worker.active = True
            try:
                with torch.inference_mode(inference), torch.no_grad():
                    work()
            finally:
                self._in_worker.active = was
        helpers = [] if self._inline else [self._executor().submit(as_worker)
                                           for _ in range(min(self.workers, parts) - caller_works)]
        try:
            if caller_works:
                as_worker()
        finally:
            for f in helpers:
                f.result()

    def in_worker(self) -> bool:
        """Whether this is one of the runtime's worker threads."""
        return getattr(self._in_worker, "active", False)

    @contextlib.contextmanager
    def in_calling_thread(self) -> Iterator[None]:
        """Every call in the calling thread for the duration (the benchmarks' memory profile, which sees one
        thread): the thresholds out of reach, and any parts still handed out run there too."""
        saved = self.min_expert_work, self.min_weight_bytes, self.min_linear_work, self._inline
        self.min_expert_work = self.min_weight_bytes = self.min_linear_work = 1 << 62
        self._inline = True
        try:
            yield
        finally:
            self.min_expert_work, self.min_weight_bytes, self.min_linear_work, self._inline = saved

    def parallel(self, rows: list[int]) -> bool:
        """Whether a call with these rows per expert goes to the workers (see MIN_EXPERT_WORK)."""
        work_per_expert = sum(rows) * self.expert_bytes // max(len(rows), 1)
        return work_per_expert >= self.min_expert_work or len(rows) * self.expert_bytes >= self.min_weight_bytes

    def linear(self, x_NI: torch.Tensor, weight_OI: torch.Tensor | QuantizedWeight) -> torch.Tensor:
        """x @ W^T: a quantized W of at least `min_weight_bytes` with its output rows split between the workers
        (called from the calling thread; a worker runs it itself), anything else by `linear_rows`."""
        if (not isinstance(weight_OI, QuantizedWeight) or weight_OI.nbytes < self.min_weight_bytes
                or self.in_worker()):
            return linear_rows(x_NI, weight_OI)
        n = weight_OI.shape[0]
        step = -(-n // (self.workers * ROW_BLOCK)) * ROW_BLOCK
        if step >= n:
            return quantized_linear(x_NI, weight_OI)
        x_NI = x_NI.to(weight_OI.dtype).contiguous()
        inference = torch.is_inference_mode_enabled()

        def part(start: int) -> torch.Tensor:
            with torch.inference_mode(inference), torch.no_grad():
                return quantized_linear(x_NI, weight_OI.rows(start, min(start + step, n)))
        parts = [self._executor().submit(part, start) for start in range(0, n, step)]
        return torch.cat([f.result() for f in parts], dim=-1)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = _single_threaded_pool(self.workers)
                weakref.finalize(self, self._pool.shutdown, wait=False)  # a runtime dropped with its model
            return self._pool

    def close(self) -> None:
        with self._lock:
            _open[:] = [r for r in _open if r() not in (self, None)]
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            if self._lowered:
                self._restore()
                self._lowered = False

    def __enter__(self) -> "CpuRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"cpu runtime: {self.workers} workers"


_open: list[weakref.ref[CpuRuntime]] = []
"""The runtimes made and not yet closed, oldest first."""


def current() -> CpuRuntime | None:
    """The newest runtime not yet closed (or dropped), if any: the one `losses.lm_loss` hands its row-wise
    cross-entropy to (rows.py)."""
    for ref in reversed(_open):
        if (runtime := ref()) is not None:
            return runtime
    return None


_caller = {"lowered": 0, "saved": 0}
_caller_lock = threading.Lock()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept = {"done": False}


KEEP_FREED_MAX_PARAMETER_BYTES = 1 << 30
"""`keep_freed_memory` acts only for models of at most this many parameter bytes: a larger model's step frees and
allocates buffers as large as the heap's holes, and keeping them made the 16B shape with two layers (2.8 GB of
fp32 parameters, one 1.5 GB tensor) train 0.9-2.2x slower a step, erratically, at 2.3 GB more RSS, where the
small preset (470 MB) trained 1.10x faster (benchmarks/README.md)."""


def keep_freed_memory(model: nn.Module | None = None) -> bool:
    """Make glibc's malloc keep freed memory for reuse (no block served by mmap, the heap never trimmed), once a
    process, for a `model` (if given) of at most KEEP_FREED_MAX_PARAMETER_BYTES, unless
    DEEPSEEKMOE_KEEP_FREED_MEMORY=0; returns whether it is in effect. By default every block over 32 MB is mapped
    afresh and unmapped when freed, so a small model's training step pays first-touch page faults on its
    (tokens x vocabulary) logits, their log-probabilities and their gradient (64 MB each at tiny) every step;
    kept, the heap's freed blocks serve the next steps' after the first few (aligned blocks need a little more
    than their size, so the heap grows a few times before it settles): keeping them made tiny-deepseekmoe's step
    1.09x and tiny-dense's 1.15x faster at 1-10% more peak RSS (benchmarks/README.md). Elsewhere than on glibc
    nothing changes."""
    if _kept["done"] or os.environ.get("DEEPSEEKMOE_KEEP_FREED_MEMORY", "1") == "0":
        return _kept["done"]
    if model is not None and sum(p.nbytes for p in model.parameters()) > KEEP_FREED_MAX_PARAMETER_BYTES:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        _kept["done"] = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False
    return _kept["done"]


_MKL_CBWR_ALL, _MKL_CBWR_STRICT = -1, 0x10000  # mkl_cbwr_get's "every setting" and the strict bit (mkl_cbwr.h)


def mkl_strict() -> bool | None:
    """Whether MKL runs in strict reproducible mode (MKL_CBWR=...,STRICT when it started: `import deepseekmoe`
    sets it first), the mode in which a matmul's bits do not depend on its operands' memory alignment; None where
    torch's BLAS is not an MKL that says (ARM, other builds)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        mode = lib.mkl_serv_cbwr_get(_MKL_CBWR_ALL)
    except (OSError, AttributeError):
        return None
    return bool(mode & _MKL_CBWR_STRICT)


def caller_threads_setting() -> int:
    """CALLER_THREADS, or the count DEEPSEEKMOE_CALLER_THREADS gives (a positive integer)."""
    value = os.environ.get("DEEPSEEKMOE_CALLER_THREADS", "")
    if not value:
        return CALLER_THREADS
    if not value.isdigit() or int(value) < 1:
        raise UserValueError(f"DEEPSEEKMOE_CALLER_THREADS={value!r} is not a positive integer")
    return int(value)


def lower_caller_threads(threads: int) -> None:
    """The intra-op thread count goes down to `threads` until every runtime that lowered it has put it back
    (runtimes may overlap: the first one saves the count, the last one restores it)."""
    with _caller_lock:
        if _caller["lowered"] == 0:
            _caller["saved"] = torch.get_num_threads()
        _caller["lowered"] += 1
        torch.set_num_threads(threads)


def restore_caller_threads() -> None:
    with _caller_lock:
        _caller["lowered"] -= 1
        if _caller["lowered"] == 0:
            torch.set_num_threads(_caller["saved"])


def intra_op_threads() -> int:
    """The process's intra-op thread count as it was before any runtime lowered it."""
    with _caller_lock:
        return _caller["saved"] if _caller["lowered"] else torch.get_num_threads()


def _single_threaded_pool(size: int) -> ThreadPoolExecutor:
    """`size` threads with one intra-op thread each (so workers never oversubscribe the cores). A thread takes the
    process-wide default count on its first parallel op, and setting a thread's count also sets that default, so
    each worker does the lazy set-up first, then goes down to one, and the caller's count is put back after."""
    caller_threads = torch.get_num_threads()
    ready = threading.Barrier(size + 1)

    def single_threaded() -> None:
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()
    pool = ThreadPoolExecutor(size, thread_name_prefix="experts")
    for _ in range(size):
        pool.submit(single_threaded)
    ready.wait()
    torch.set_num_threads(caller_threads)
    return pool


class SmallRowsFeedForward(FeedForward):
    """FeedForward whose matmuls run through `linear_rows` where there is nothing to differentiate and only a
    handful of rows (decode); the same numbers as FeedForward otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.gate_proj.weight.requires_grad)
        if wants_grad or x.numel() > WEIGHT_MAJOR_MAX_ROWS * x.shape[-1]:
            return super().forward(x)
        x_NI = x.reshape(-1, x.shape[-1])
        h_NF = F.silu(linear_rows(x_NI, self.gate_proj.weight)).mul_(linear_rows(x_NI, self.up_proj.weight))
        return linear_rows(h_NF, self.down_proj.weight).reshape(x.shape)
