"""MoE layer benchmark: our MoE block (each experts kernel and runtime) vs the dense-equivalent SwiGLU FFN vs
transformers' DeepseekV2Moe (every experts implementation usable on the device), side by side in one process.

    python benchmarks/moe_layer.py [--shapes s1,decode-1] [--impls dense,ours:auto,hf:grouped_mm] [--json]
    deepseekmoe bench moe-layer [same options]

Every contender computes the same function on the same weights: ours and transformers' share the parameter
tensors (outputs are checked to agree), routing is the softmax top-k of a random router (near-uniform load).
Timing: after one warm-up call each, the contenders run interleaved (the order rotates every repeat), one call per
turn; the table reports the median and the minimum, and ratios as the median over rounds of the same-round ratio.
Before every timed call (outside the timer) `--cache cold`, the default, streams twice the last-level cache through
the cores, so weights come from memory as they do inside a model; `--cache warm` skips that.
"train" shapes time forward + backward of the block output (gradients set to None before each call, as
`zero_grad(set_to_none=True)` does); "infer" shapes time a forward under `torch.no_grad()`.
GFLOP/s counts the activated expert FLOPs only (2 x 3 x D x F x (K + shared) per token, x3 for training), the same
FLOPs the dense-equivalent FFN does; the router's 2 x D x E per token is not counted.
Peak memory: a separate call per contender; on CPU every tensor allocation and free of the step is read from the
torch profiler's allocation events and the peak of their running sum is reported (bytes held before the step,
such as parameters and inputs, are not counted). That call runs with one intra-op thread so that all allocations
happen on the profiled thread, and the CPU runtime keeps the experts there too (`in_calling_thread`; on its workers
a chunk's outputs wait for their commit, a little more). On CUDA: max_memory_allocated above the starting level.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from deepseekmoe import MoE, ModelConfig
from deepseekmoe.errors import UserValueError
from deepseekmoe.runtime.cpu import CpuRuntime
from deepseekmoe.model.layers import FeedForward


@dataclass(frozen=True)
class Shape:
    hidden: int
    experts: int
    width: int
    shared: int
    top_k: int
    tokens: int
    mode: str  # "train" (forward + backward) or "infer" (forward, no grad)

    def flops(self) -> float:
        fwd = 2.0 * 3 * self.hidden * self.width * (self.top_k + self.shared) * self.tokens
        return fwd * (3 if self.mode == "train" else 1)


def _s1(tokens: int, mode: str) -> Shape:
    return Shape(512, 64, 128, 2, 6, tokens, mode)


def _16b(tokens: int, mode: str) -> Shape:
    return Shape(2048, 64, 1408, 2, 6, tokens, mode)


SHAPES: dict[str, Shape] = {
    "decode-1": _s1(1, "infer"), "decode-4": _s1(4, "infer"), "decode-16": _s1(16, "infer"),
    "train-1k": _s1(1024, "train"), "s1": _s1(4096, "train"), "train-16k": _s1(16384, "train"),
    "16b-decode-1": _16b(1, "infer"), "16b-decode-16": _16b(16, "infer"),
    "16b-2k": _16b(2048, "train"), "16b-4k": _16b(4096, "train"),
}
DEFAULT_SHAPES = "decode-1,decode-4,decode-16,train-1k,s1,train-16k,16b-decode-1,16b-decode-16"
OURS = ["ours:auto", "ours:grouped_mm", "ours:per_expert", "ours:workers", "ours:loop"]
HF = ["hf:eager", "hf:grouped_mm", "hf:batched_mm"]
BATCHED_MM_MAX_BYTES = 2 << 30  # hf:batched_mm copies one expert's weights per row; skipped above


def build_ours(shape: Shape, dtype: torch.dtype, device: str) -> MoE:
    cfg = ModelConfig(hidden_size=shape.hidden, n_routed_experts=shape.experts, moe_intermediate_size=shape.width,
                      n_shared_experts=shape.shared, num_experts_per_tok=shape.top_k, experts_impl="grouped")
    moe = MoE(cfg).to(device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return moe


def build_hf(ours: MoE, shape: Shape) -> torch.nn.Module | None:
    """transformers' DeepseekV2Moe sharing our parameter tensors (same names); None without transformers."""
    try:
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    except ImportError:
        return None
    cfg = DeepseekV2Config(hidden_size=shape.hidden, moe_intermediate_size=shape.width,
                           n_routed_experts=shape.experts, n_shared_experts=shape.shared,
                           num_experts_per_tok=shape.top_k, topk_method="greedy", routed_scaling_factor=1.0,
                           norm_topk_prob=False, hidden_act="silu")
    with torch.device("meta"):
        hf = DeepseekV2Moe(cfg)
    hf.load_state_dict(ours.state_dict(), assign=True, strict=True)
    return hf


def build_dense(shape: Shape, dtype: torch.dtype, device: str) -> FeedForward:
    ffn = FeedForward(shape.hidden, shape.width * (shape.top_k + shape.shared)).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(0.0, 0.02)
    return ffn


def contenders(shape: Shape, impls: list[str], dtype: torch.dtype, device: str) -> dict[str, Callable]:
    """name -> a module call on (1, T, D) input returning the block output; skips what cannot run here."""
    ours = build_ours(shape, dtype, device)
    expert_bytes = ours.experts.gate_up_proj[0].nbytes + ours.experts.down_proj[0].nbytes
    runtime = CpuRuntime(torch.get_num_threads(), expert_bytes) if device == "cpu" else None
    every_call = CpuRuntime(torch.get_num_threads(), expert_bytes, min_expert_work=0) if device == "cpu" else None
    hf = build_hf(ours, shape) if any(i.startswith("hf:") for i in impls) else None
    dense = build_dense(shape, dtype, device) if "dense" in impls else None
    calls: dict[str, Callable] = {}
    weight_copies = shape.tokens * shape.top_k * 3 * shape.hidden * shape.width * torch.finfo(dtype).bits // 8
    for name in impls:
        kind, _, impl = name.partition(":")
        if kind == "dense":
            calls[name] = dense
        elif impl == "batched_mm" and weight_copies > BATCHED_MM_MAX_BYTES:
            continue  # one expert weight copy per row: would not fit
        elif impl == "grouped_mm" and kind == "ours" and any(w * dtype.itemsize % 16 for w in (shape.hidden,
                                                                                                shape.width)):
            continue  # torch's grouped GEMM does not take these operands
        elif impl.startswith("workers") and runtime is None:
            continue  # the CPU runtime is for CPUs
        elif kind == "ours":
            calls[name] = _ours_call(ours, impl, every_call if impl == "workers" else runtime)
        elif kind == "hf" and hf is not None:
            calls[name] = _hf_call(hf, impl)
    return calls


def _ours_call(moe: MoE, variant: str, runtime: CpuRuntime | None) -> Callable:
    """variant: "auto" (what the commands run here: `runtime.for_device`, the CPU runtime where there are 2+
    threads), "grouped_mm" / "per_expert" (that kernel in the calling thread), "workers" (the CPU runtime's workers
    on every call, whatever its size), "loop"."""
    use_runtime = variant.startswith("workers") or (variant == "auto" and runtime is not None and runtime.workers > 1)

    def call(x: torch.Tensor) -> torch.Tensor:
        CpuRuntime.remove(moe)
        moe.experts.impl = "loop" if variant == "loop" else "grouped"
        moe.experts.pinned_kernel = variant if variant in ("grouped_mm", "per_expert") else None
        if use_runtime:
            runtime.attach(moe)
        return moe(x)[0]
    call.module = moe  # type: ignore[attr-defined]
    call.runtime = runtime if use_runtime else None  # type: ignore[attr-defined]
    return call


def _hf_call(hf: torch.nn.Module, impl: str) -> Callable:
    def call(x: torch.Tensor) -> torch.Tensor:
        hf.config._experts_implementation = impl
        return hf(x)
    call.module = hf  # type: ignore[attr-defined]
    return call


def _module(call: Callable) -> torch.nn.Module:
    return call if isinstance(call, torch.nn.Module) else call.module  # type: ignore[attr-defined]


def make_step(call: Callable, shape: Shape, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One block call: forward (+ backward for "train"). `step.reset()` drops the parameter gradients, as
    `zero_grad(set_to_none=True)` does; it runs before every timed or measured call, outside the measurement."""
    params = list(_module(call).parameters())

    def step() -> torch.Tensor:
        if shape.mode == "infer":
            with torch.no_grad():
                return call(x)
        xg = x.detach().requires_grad_()
        y = call(xg)
        y.backward(grad)
        return y.detach()

    def reset() -> None:
        for p in params:
            p.grad = None
    step.reset = reset  # type: ignore[attr-defined]
    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cache_flusher(cache: str, device: str) -> Callable[[], None]:
    """cache="cold": a call that streams twice the last-level cache through the cores, run before every timed call
    (outside the timer), so each call finds its weights in memory, not in cache, as it would inside a model whose
    other layers ran in between; "warm": nothing (contenders then find in cache what the previous one read: they
    share weights). Accelerators are left as they are."""
    if cache == "warm" or device != "cpu":
        return lambda: None
    buffer = torch.zeros(2 * _last_level_cache_bytes() // 4)
    return lambda: buffer.add_(1.0)


def _last_level_cache_bytes() -> int:
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = Path(path).read_text().strip().upper()
        sizes.append(int(text.rstrip("KM")) * (1 << 20 if text.endswith("M") else 1 << 10 if text.endswith("K") else 1))
    return max(sizes, default=32 << 20)


def time_interleaved(steps: dict[str, Callable], repeats: int, budget_s: float, device: str,
                     log: Callable[[str], None], flush: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """One warm-up call each, then `repeats` rounds in rotating order, `flush()` before every call; a contender
    whose warm-up took longer than budget_s / repeats gets fewer rounds (at least one)."""
    warm: dict[str, float] = {}
    for name, step in steps.items():
        step.reset()  # type: ignore[attr-defined]
        flush()
        t0 = time.perf_counter()
        step()
        _sync(device)
        warm[name] = time.perf_counter() - t0
        log(f"  warm-up {name}: {warm[name] * 1e3:.1f} ms")
    rounds = {n: max(1, min(repeats, int(budget_s / max(w, 1e-9)))) for n, w in warm.items()}
    times: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if len(times[name]) >= rounds[name]:
                continue
            steps[name].reset()  # type: ignore[attr-defined]
            flush()
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def peak_memory(step: Callable[[], torch.Tensor], device: str, runtime: CpuRuntime | None = None) -> int:
    """Peak bytes allocated during one step above what was allocated before it (on CPU with the experts in the
    calling thread, the profiled one)."""
    step.reset()  # type: ignore[attr-defined]
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every allocation on this (profiled) thread: no expert worker threads
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, \
                (runtime.in_calling_thread() if runtime is not None else contextlib.nullcontext()):
            step()
    finally:
        torch.set_num_threads(threads)
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation:
            allocs.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    current = peak = 0
    for _, size in sorted(allocs):
        current += size
        peak = max(peak, current)
    return peak


COMPETITOR = ("import torch\ntorch.set_num_threads(2)\na, b = torch.randn(256, 256), torch.randn(256, 256)\n"
              "while True:\n    a @ b\n    (a * b).sum()\n")


COMPETITORS = {"matmul": COMPETITOR, "spin": "while True: pass\n"}
"""--compete kinds: 2-thread matmuls (both cores, OpenMP teams of its own) or one pure-Python busy loop."""


def add_compete_option(p: argparse.ArgumentParser) -> None:
    """`--compete [matmul|spin]`: the competing process (`competing_process`) a benchmark runs beside."""
    p.add_argument("--compete", nargs="?", const="matmul", default="", choices=["matmul", "spin"],
                   help="a competing process for the whole run: 2-thread matmuls (default) or a Python busy loop")


@contextlib.contextmanager
def competing_process(enabled: bool | str = True):
    """A second process for the duration: a busy machine, as users' are. `enabled` True or "matmul": 2-thread
    256 x 256 matmuls; "spin": `while True: pass` (one core); False or "": none."""
    kind = "matmul" if enabled is True else enabled
    proc = subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]]) if kind else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def machine() -> dict[str, object]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        model = ""
    info: dict[str, object] = {
        "cpu": model or platform.processor(), "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
        "torch": torch.__version__, "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def check_agreement(steps: dict[str, Callable], shape: Shape, x: torch.Tensor) -> dict[str, float]:
    """Max |y - y_ref| / max |y_ref| of every MoE contender against the first one, forward only."""
    with torch.no_grad():
        outs = {n: c(x).float() for n, c in steps.items() if n != "dense"}
    if not outs:
        return {}
    ref = next(iter(outs.values()))
    scale = ref.abs().max().clamp_min(1e-30)
    return {n: float((y - ref).abs().max() / scale) for n, y in outs.items()}


def run_shape(name: str, shape: Shape, impls: list[str], *, dtype: torch.dtype, device: str, repeats: int,
              budget_s: float, memory: bool, cache: str, log: Callable[[str], None]) -> list[dict[str, object]]:
    log(f"shape {name}: {shape}")
    calls = contenders(shape, impls, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, shape.tokens, shape.hidden, generator=gen).to(device=device, dtype=dtype)
    grad = torch.randn(1, shape.tokens, shape.hidden, generator=gen).to(device=device, dtype=dtype)
    agreement = check_agreement(calls, shape, x)
    steps = {n: make_step(c, shape, x, grad) for n, c in calls.items()}
    rounds = repeats * 10 if shape.mode == "infer" else repeats  # decode calls take ~1 ms: more samples
    times = time_interleaved(steps, rounds, budget_s, device, log, cache_flusher(cache, device))
    rows = []
    for n, ts in times.items():
        med = statistics.median(ts)
        rows.append({"shape": name, **dataclasses.asdict(shape), "dtype": str(dtype).removeprefix("torch."),
                     "device": device, "impl": n, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                     "runs": len(ts), "gflops": shape.flops() / med / 1e9,
                     "max_rel_diff": agreement.get(n)})
        if memory:
            rows[-1]["peak_mb"] = peak_memory(steps[n], device, getattr(calls[n], "runtime", None)) / 2**20
    hf_best = min((r for r in rows if str(r["impl"]).startswith("hf:")), key=lambda r: r["median_ms"], default=None)
    for r in rows:
        r["x_dense"] = paired_ratio(times[r["impl"]], times["dense"]) if "dense" in times else None
        r["x_best_hf"] = paired_ratio(times[r["impl"]], times[hf_best["impl"]]) if hf_best else None
    return rows


def paired_ratio(ts: list[float], ref: list[float]) -> float:
    """Time of `ts` relative to `ref`: the median over rounds of the ratio of the two calls made in the same round
    (neighbours in time, so drifts of a shared machine's speed cancel), or the ratio of medians when the two ran a
    different number of rounds."""
    if len(ts) != len(ref):
        return statistics.median(ts) / statistics.median(ref)
    return statistics.median(t / r for t, r in zip(ts, ref))


def format_table(rows: list[dict[str, object]]) -> str:
    cols = [("impl", "{}"), ("median_ms", "{:.2f}"), ("min_ms", "{:.2f}"), ("runs", "{}"), ("x_dense", "{:.2f}"),
            ("x_best_hf", "{:.2f}"), ("gflops", "{:.1f}"), ("peak_mb", "{:.1f}"), ("max_rel_diff", "{:.1e}")]
    out, shape = [], None
    for r in rows:
        if r["shape"] != shape:
            shape = r["shape"]
            out.append(f"\n{shape}: T={r['tokens']} D={r['hidden']} E={r['experts']}x{r['width']} "
                       f"K={r['top_k']} shared={r['shared']} {r['dtype']} {r['mode']} ({r['device']})")
            out.append("  ".join(f"{c:>12}" for c, _ in cols))
        out.append("  ".join(f"{fmt.format(r[c]) if r.get(c) is not None else '-':>12}" for c, fmt in cols))
    return "\n".join(out)


def run(*, shapes: str = DEFAULT_SHAPES, impls: str | None = None, repeats: int = 5, budget_s: float = 20.0,
        dtype: str = "float32", device: str = "cpu", memory: bool = True, cache: str = "cold",
        as_json: bool = False) -> int:
    """Benchmark the shapes; print a table (or one JSON object with --json). Returns an exit code."""
    names = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        raise UserValueError(f"unknown shape(s) {', '.join(unknown)}; available: {', '.join(SHAPES)}")
    chosen = [i.strip() for i in impls.split(",")] if impls else ["dense", *OURS, *HF]
    bad = [i for i in chosen if i not in ["dense", *OURS, *HF]]
    if bad:
        raise UserValueError(f"unknown impl(s) {', '.join(bad)}; available: {', '.join(['dense', *OURS, *HF])}")
    if cache not in ("cold", "warm"):
        raise UserValueError(f"cache={cache!r}: expected cold or warm")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserValueError("device=cuda but no CUDA device is available")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if as_json else (lambda m: print(m, flush=True))
    info = machine()
    log(" ".join(f"{k}={v}" for k, v in info.items()))
    rows: list[dict[str, object]] = []
    for name in names:
        rows += run_shape(name, SHAPES[name], chosen, dtype=torch_dtype, device=device, repeats=repeats,
                          budget_s=budget_s, memory=memory, cache=cache, log=log)
    if as_json:
        print(json.dumps({"machine": info, "results": rows}, indent=1))
    else:
        print(format_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated, from: {', '.join(SHAPES)}")
    p.add_argument("--impls", default=None, help=f"comma-separated, from: dense, {', '.join(OURS + HF)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=20.0, help="timed seconds per contender and shape, roughly")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    p.add_argument("--cache", default="cold", choices=["cold", "warm"],
                   help="cold: stream 2x the last-level cache before every timed call (as between a model's "
                        "layers); warm: contenders find what the previous one read (they share weights)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")
    p.add_argument("--compete", action="store_true", help="a competing 2-thread matmul process throughout")
    args = vars(p.parse_args(argv))
    with competing_process(args.pop("compete")):
        return run(**args)


if __name__ == "__main__":
    sys.exit(main())
