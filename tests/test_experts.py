"""Routed experts: both grouped kernels, inline and on the CPU runtime's workers, equal the `loop` reference in
outputs and in the gradients of x, the gate weights and both expert weight tensors (DESIGN.md must-have 2), on
routings with empty experts, a single token, every token on one expert, K = 1; under fp32 and bf16 autocast, with
and without gradients, with shared experts; the same bits on every run; the kernel chooser and the runtime."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from deepseekmoe import MoE, ModelConfig, Transformer
from deepseekmoe.model.experts import INLINE, RoutedExperts, choose_kernel, experts_grouped, experts_loop
from deepseekmoe.model.layers import FeedForward
from deepseekmoe.runtime import describe, for_device
from deepseekmoe.runtime.cpu import CpuRuntime, SmallRowsFeedForward, linear_rows, split


@pytest.fixture(scope="module")
def workers():
    """A runtime that hands every call to 2 workers, however little work (min_expert_work=0)."""
    with CpuRuntime(2, min_expert_work=0) as runtime:
        yield runtime


def _problem(t: int, d: int, e: int, f: int, k: int, routing: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen)
    gate_up = torch.randn(e, 2 * f, d, generator=gen) / d ** 0.5
    down = torch.randn(e, d, f, generator=gen) / f ** 0.5
    if routing == "random":  # distinct experts per token; experts e-2, e-1 never chosen
        idx = torch.rand(t, e - 2, generator=gen).topk(k, dim=-1).indices
    elif routing == "one_expert":  # every (token, slot) on expert 1 (duplicates within a token)
        idx = torch.ones(t, k, dtype=torch.long)
    else:
        raise ValueError(routing)
    weight = torch.rand(t, k, generator=gen)
    return x, idx, weight, gate_up, down


CASES = {  # name: (T, D, E, F, K, routing)
    "random": (37, 16, 8, 12, 3, "random"),      # experts 6 and 7 receive no tokens
    "single_token": (1, 16, 8, 12, 3, "random"),
    "one_expert": (9, 16, 8, 12, 2, "one_expert"),
    "top1": (23, 16, 8, 12, 1, "random"),
    "odd_sizes": (11, 10, 5, 6, 2, "random"),    # strides not 16-byte aligned: grouped_mm does not take them
}
VARIANTS = ["grouped_mm", "per_expert", "per_expert_workers"]


def _forward(variant: str, runtime: CpuRuntime, x, idx, weight, gate_up, down):
    if variant == "loop":
        return experts_loop(x, idx, weight, gate_up, down)
    kernel = "grouped_mm" if variant == "grouped_mm" else "per_expert"
    return experts_grouped(x, idx, weight, gate_up, down, kernel, runtime if variant.endswith("workers") else INLINE)


def _run(variant: str, runtime: CpuRuntime, x, idx, weight, gate_up, down, grad_seed: int = 1):
    leaves = [t.clone().requires_grad_() for t in (x, weight, gate_up, down)]
    xl, wl, gul, dl = leaves
    y = _forward(variant, runtime, xl, idx, wl, gul, dl)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype))
    return [y.detach()] + [leaf.grad for leaf in leaves]


def _skip_unsupported(variant: str, x: torch.Tensor, gate_up: torch.Tensor) -> None:
    """torch's grouped GEMM (used on CUDA; it runs on CPU too) needs every row stride a multiple of 16 bytes."""
    widths = (x.shape[1], gate_up.shape[1] // 2)
    if variant == "grouped_mm" and any(w * x.element_size() % 16 for w in widths):
        pytest.skip("grouped_mm does not take these operands")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_grouped_matches_loop(variant: str, case: str, workers: CpuRuntime) -> None:
    problem = _problem(*CASES[case])
    _skip_unsupported(variant, problem[0], problem[3])
    ref, got = _run("loop", workers, *problem), _run(variant, workers, *problem)
    for name, r, g in zip(["y", "d_x", "d_weight", "d_gate_up", "d_down"], ref, got):
        assert g is not None and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_unused_experts_get_exact_zero_weight_gradients(variant: str, workers: CpuRuntime) -> None:
    x, idx, weight, gate_up, down = _problem(*CASES["random"])
    _, _, _, d_gate_up, d_down = _run(variant, workers, x, idx, weight, gate_up, down)
    assert torch.count_nonzero(d_gate_up[-2:]) == 0 and torch.count_nonzero(d_down[-2:]) == 0
    assert torch.count_nonzero(d_gate_up[:-2].abs().sum((1, 2))) == 6  # every used expert has a gradient


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_no_grad_forward_matches_loop(variant: str, case: str, workers: CpuRuntime) -> None:
    """Without gradients the grouped path skips its autograd Function, and on the runtime a handful of rows run
    through `linear_rows`; same numbers."""
    problem = _problem(*CASES[case])
    _skip_unsupported(variant, problem[0], problem[3])
    ref = experts_loop(*problem)
    with torch.no_grad():
        got = _forward(variant, workers, *problem)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_empty_input(workers: CpuRuntime) -> None:
    x, idx, weight, gate_up, down = _problem(*CASES["random"])
    for variant in ["loop", *VARIANTS]:
        y = _forward(variant, workers, x[:0], idx[:0], weight[:0], gate_up, down)
        assert y.shape == (0, 16)


def _moe_pair(impl_runtime: bool, n_shared: int = 2, d: int = 16, f: int = 8):
    cfg = ModelConfig(hidden_size=d, n_routed_experts=8, moe_intermediate_size=f, n_shared_experts=n_shared,
                      num_experts_per_tok=3, experts_impl="grouped")
    torch.manual_seed(0)
    fast = MoE(cfg)
    for p in fast.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref = MoE(dataclasses.replace(cfg, experts_impl="loop"))
    ref.load_state_dict(fast.state_dict())
    return ref, fast


@pytest.mark.parametrize("variant", ["per_expert", "grouped_mm", "runtime"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("tokens", [2, 40])
def test_moe_block_matches_loop(variant: str, autocast: bool, tokens: int) -> None:
    """The whole block (router + routed + shared experts) equals experts_impl="loop" in outputs and gradients,
    under fp32 and under CPU bf16 autocast (the same casts on both sides), with either kernel in the calling
    thread and on the CPU runtime's workers."""
    ref, fast = _moe_pair(variant == "runtime")
    fast.experts.pinned_kernel = "grouped_mm" if variant == "grouped_mm" else None
    runtime = CpuRuntime.apply(fast, 2, min_expert_work=0) if variant == "runtime" else None
    x = torch.randn(1, tokens, 16)
    outs = []
    for m in (ref, fast):
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, _ = m(xg)
        y.float().square().sum().backward()
        outs.append([y, xg.grad, m.experts.gate_up_proj.grad, m.gate.weight.grad,
                     m.shared_experts.up_proj.weight.grad])
    for r, g in zip(*outs):  # bf16: a few roundings of 2^-8 each, relative to the tensor's scale
        tol = dict(rtol=0.03, atol=0.03 * r.abs().max().item()) if autocast else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.float(), r.float(), **tol)
    if runtime is not None:
        runtime.close()


@pytest.mark.parametrize("tokens", [1, 2, 9])
def test_moe_block_no_grad_under_bf16_autocast(tokens: int) -> None:
    """Decode under torch.no_grad() and CPU bf16 autocast with shared experts, inline and on the runtime (the
    runtime's FFNs and experts take the small-row path): runs, and matches the loop block under the same casts."""
    ref, fast = _moe_pair(True)
    x = torch.randn(1, tokens, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = ref(x)
        got_inline, _ = fast(x)
        with CpuRuntime.apply(fast, 2, min_expert_work=0):
            got_runtime, _ = fast(x)
    for got in (got_inline, got_runtime):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_same_bits_every_run_on_the_workers() -> None:
    """Chunks go to whichever worker is free, yet every reduction has a fixed order: 20 runs of a call on 2 workers
    (16 chunks each) give bit-identical outputs and gradients."""
    problem = _problem(600, 32, 16, 16, 4, "random")
    with CpuRuntime(2, min_expert_work=0) as runtime:
        first = _run("per_expert_workers", runtime, *problem)
        for _ in range(20):
            again = _run("per_expert_workers", runtime, *problem)
            for a, b in zip(first, again):
                assert torch.equal(a, b)


def test_training_on_the_workers_repeats_bit_for_bit(make_config) -> None:
    """A few AdamW steps of a small Transformer whose experts run on 2 workers (every call, however small): two runs
    from the same seed give the same losses and weights bit for bit."""
    def run() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = Transformer(make_config(n_routed_experts=16, num_experts_per_tok=4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, model.config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
        losses = []
        with CpuRuntime.apply(model, 2, min_expert_work=0):
            for _ in range(4):
                logits = model(ids[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses, model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    (a, wa), (b, wb) = run(), run()
    assert a == b and torch.equal(wa, wb)


def test_choose_kernel() -> None:
    """grouped_mm on CUDA in bf16 (the trainer's autocast dtype) where the 16-byte strides allow it; per_expert
    otherwise (CPU: measured faster). Decided from the device description alone, so it is checked without a GPU."""
    assert choose_kernel("cuda", torch.bfloat16, 2048, 1408) == "grouped_mm"  # the 16B shape under bf16 autocast
    assert choose_kernel("cuda", torch.float32, 2048, 1408) == "per_expert"   # fp32 grouped_mm is a slow fallback
    assert choose_kernel("cuda", torch.bfloat16, 128, 86) == "per_expert"     # 86 x 2 bytes: not a 16-byte multiple
    assert choose_kernel("cpu", torch.float32, 512, 128) == "per_expert"
    assert choose_kernel("cpu", torch.bfloat16, 512, 128) == "per_expert"
    assert choose_kernel("mps", torch.bfloat16, 512, 128) == "per_expert"


def test_cuda_training_under_bf16_autocast_chooses_grouped_mm() -> None:
    """The trainer's default on CUDA is bf16 autocast over fp32 weights: the kernel follows the compute dtype after
    autocast (bf16), not the weights' dtype (fp32), so the 16B model trains on grouped_mm there."""
    from deepseekmoe import load_preset
    from deepseekmoe.model.experts import compute_dtype

    with torch.device("meta"):
        model = Transformer(load_preset("deepseekmoe-16b"))
    x = torch.randn(2, 2048)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
    assert describe(model, "cuda", torch.bfloat16) == "grouped (grouped_mm)"
    assert describe(model, "cuda", torch.float32) == "grouped (per_expert, inline)"
    assert describe(model, "cpu", torch.float32) == "grouped (per_expert, inline)"


def test_runtime_for_device_and_describe(make_config) -> None:
    model = Transformer(make_config())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert for_device(model, "cpu") is None  # one thread: nothing to gain
        torch.set_num_threads(2)
        assert for_device(model, "cuda") is None
        runtime = for_device(model, "cpu")
        assert isinstance(runtime, CpuRuntime)
        assert describe(model, "cpu", torch.float32) == "grouped (per_expert, cpu runtime: 2 workers)"
        assert any(type(m) is SmallRowsFeedForward for m in model.modules())
        CpuRuntime.remove(model)
        assert describe(model, "cpu", torch.float32) == "grouped (per_expert, inline)"
        assert not any(type(m) is SmallRowsFeedForward for m in model.modules())
        runtime.close()
    finally:
        torch.set_num_threads(before)
    dense = Transformer(make_config(router="none", n_routed_experts=None, n_shared_experts=0))
    assert describe(dense, "cpu", torch.float32) == "none (dense)"


def test_workers_keep_one_intra_op_thread_and_the_caller_keeps_its_count() -> None:
    """Each worker runs its ops on one thread, also after ops that set up OpenMP (a worker that took the caller's
    count would fork a team of its own: 2 workers x 2 threads on 2 cores); the caller's count is unchanged."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    counts: list[int] = []
    try:
        with CpuRuntime(2, min_expert_work=0) as runtime:
            def fn(chunk: list[int]):
                torch.ones(1 << 16).sum()  # a parallel op, then the count it ran under
                counts.append(torch.get_num_threads())
                return lambda: None
            runtime.run(fn, list(range(8)), [10] * 8)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert counts and set(counts) == {1}


def test_runner_runs_every_expert_once_and_commits_in_order_while_a_slow_worker_does_less() -> None:
    """Workers take chunks as they finish: every expert runs exactly once, while one worker is held up on its first
    chunk the other computes all the rest, and yet the commits (the sums into shared outputs) run in chunk order."""
    seen: list[int] = []
    committed: list[int] = []
    others_done = threading.Event()
    experts = list(range(32))
    chunk_of_0 = split(experts, [1] * 32, 2 * 16)[0]

    def fn(chunk: list[int]):
        if chunk[0] == 0:
            assert others_done.wait(30)
        seen.extend(chunk)
        if len(seen) == len(experts) - len(chunk_of_0):
            others_done.set()
        return lambda: committed.extend(chunk)
    with CpuRuntime(2, min_expert_work=0) as runtime:
        runtime.run(fn, experts, [1] * 32)
    assert sorted(seen) == experts and seen[:len(chunk_of_0)] != chunk_of_0  # chunk 0 computed last
    assert committed == experts


def test_runner_runs_small_calls_in_the_calling_thread() -> None:
    threads: list[threading.Thread] = []
    with CpuRuntime(2, expert_bytes=1 << 20) as runtime:  # default thresholds: 10 rows of 1 MB experts, in the caller
        runtime.run(lambda chunk: threads.append(threading.current_thread()) or (lambda: None), [0, 1], [10, 10])
    assert threads == [threading.main_thread()] * 2  # expert by expert


def test_split_balances_rows() -> None:
    assert split([0, 1, 3, 5], [10, 10, 5, 15], 2) == [[0, 1], [3, 5]]
    assert split([0, 1, 3, 5], [10, 10, 5, 15], 1) == [[0, 1, 3, 5]]
    assert split([0, 1, 3, 5], [10, 10, 5, 15], 8) == [[0], [1], [3], [5]]  # never an empty run


@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8, 13])
@pytest.mark.parametrize("size", [(40, 24), (1024, 512)])  # one row doubled below 1 MB, a GEMV above
def test_linear_rows_equals_linear(rows: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(*size), torch.randn(rows, size[1])
    torch.testing.assert_close(linear_rows(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 13])
def test_small_rows_feed_forward_equals_feed_forward(rows: int) -> None:
    torch.manual_seed(0)
    ffn = FeedForward(24, 40)
    x = torch.randn(1, rows, 24)
    ref = ffn(x)
    ffn.__class__ = SmallRowsFeedForward
    with torch.no_grad():
        got = ffn(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    y = ffn(x.requires_grad_())  # gradients wanted: the plain path, with autograd
    assert y.requires_grad
