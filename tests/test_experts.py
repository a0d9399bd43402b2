"""Routed experts: every fast strategy equals the `loop` reference in outputs and in the gradients of x, the gate
weights and both expert weight tensors (DESIGN.md must-have 2), on routings with empty experts, a single token,
every token on one expert, K = 1, and in bf16; plus the strategy chooser and the module interface."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepseekmoe import MoE, ModelConfig
from deepseekmoe.model.experts import (
    NO_GRAD_SLICES_MIN_ROWS, PARALLEL_MIN_ROWS, ROWS_MAX_PER_EXPERT, STRATEGIES, RoutedExperts, choose_strategy,
    experts_forward, experts_loop, grouped_mm_supported,
)

FAST = [s for s in STRATEGIES if s != "loop"]


def _problem(t: int, d: int, e: int, f: int, k: int, routing: str, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen).to(dtype)
    gate_up = (torch.randn(e, 2 * f, d, generator=gen) / d ** 0.5).to(dtype)
    down = (torch.randn(e, d, f, generator=gen) / f ** 0.5).to(dtype)
    if routing == "random":  # distinct experts per token; experts e-2, e-1 never chosen
        idx = torch.rand(t, e - 2, generator=gen).topk(k, dim=-1).indices
    elif routing == "one_expert":  # every (token, slot) on expert 1 (duplicates within a token)
        idx = torch.ones(t, k, dtype=torch.long)
    else:
        raise ValueError(routing)
    weight = torch.rand(t, k, generator=gen)
    return x, idx, weight, gate_up, down


def _run(strategy: str, x, idx, weight, gate_up, down, grad_seed: int = 1):
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_(),
              gate_up.clone().requires_grad_(), down.clone().requires_grad_()]
    xl, wl, gul, dl = leaves
    y = experts_forward(xl, idx, wl, gul, dl, strategy)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
    y.backward(grad)
    return [y.detach()] + [leaf.grad for leaf in leaves]


CASES = {  # name: (T, D, E, F, K, routing)
    "random": (37, 16, 8, 12, 3, "random"),      # experts 6 and 7 receive no tokens
    "single_token": (1, 16, 8, 12, 3, "random"),
    "one_expert": (9, 16, 8, 12, 2, "one_expert"),
    "top1": (23, 16, 8, 12, 1, "random"),
    "odd_sizes": (11, 10, 5, 6, 2, "random"),    # strides not 16-byte aligned: grouped_mm unsupported
}


@pytest.mark.parametrize("strategy", FAST)
@pytest.mark.parametrize("case", CASES)
def test_strategy_matches_loop(strategy: str, case: str) -> None:
    problem = _problem(*CASES[case])
    if strategy == "grouped_mm" and not grouped_mm_supported(problem[0], problem[3], problem[4]):
        pytest.skip("grouped_mm does not accept these strides")
    ref = _run("loop", *problem)
    got = _run(strategy, *problem)
    for name, r, g in zip(["y", "d_x", "d_weight", "d_gate_up", "d_down"], ref, got):
        assert g is not None and g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", FAST)
def test_unused_experts_get_exact_zero_weight_gradients(strategy: str) -> None:
    x, idx, weight, gate_up, down = _problem(*CASES["random"])
    _, _, _, d_gate_up, d_down = _run(strategy, x, idx, weight, gate_up, down)
    assert torch.count_nonzero(d_gate_up[-2:]) == 0 and torch.count_nonzero(d_down[-2:]) == 0
    assert torch.count_nonzero(d_gate_up[:-2].abs().sum((1, 2))) == 6  # every used expert has a gradient


@pytest.mark.parametrize("strategy", FAST)
@pytest.mark.parametrize("case", CASES)
def test_no_grad_forward_matches_loop(strategy: str, case: str) -> None:
    """Without gradients the grouped path skips its autograd Function (decode); same numbers."""
    x, idx, weight, gate_up, down = _problem(*CASES[case])
    ref = experts_loop(x, idx, weight, gate_up, down)
    with torch.no_grad():
        got = experts_forward(x, idx, weight, gate_up, down, strategy)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", FAST)
def test_bf16_forward_close_to_fp32_reference(strategy: str) -> None:
    x, idx, weight, gate_up, down = _problem(40, 32, 8, 16, 2, "random")
    ref = experts_loop(x, idx, weight, gate_up, down)
    with torch.no_grad():
        got = experts_forward(x.bfloat16(), idx, weight, gate_up.bfloat16(), down.bfloat16(), strategy)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize("path", ["as_chosen", "one_row_gemv", "row_major_only", "on_workers"])
def test_rows_paths_match_loop(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """"rows" (decode without autograd) runs each expert's rows weight-major (W @ x^T, one row doubled) or
    row-major, in the calling thread or on the CPU workers; every combination equals the loop. The routing gives
    experts 1, 2-7 and 8+ rows."""
    from deepseekmoe.model import cpu_workers, experts_rows, layers

    x, _, weight, gate_up, down = _problem(12, 16, 8, 12, 2, "random", seed=3)
    idx = torch.tensor([[0] * 9 + [1, 2, 2], [2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5]]).t()  # rows 9, 1, 3, 3, 4, 4, 0, 0
    if path == "one_row_gemv":
        monkeypatch.setattr(layers, "PAD_ONE_ROW_MAX_BYTES", 0)
    if path == "row_major_only":
        monkeypatch.setattr(layers, "WEIGHT_MAJOR_MAX_ROWS", 0)
        monkeypatch.setattr(layers, "PAD_ONE_ROW_MAX_BYTES", 0)
    threads = torch.get_num_threads()
    if path == "on_workers":
        monkeypatch.setattr(experts_rows, "ROWS_MIN_WEIGHT_BYTES_PER_WORKER", 1)
        torch.set_num_threads(2)
    calls = []
    real = cpu_workers.run_chunks
    monkeypatch.setattr(experts_rows, "run_chunks", lambda fn, chunks, outs, workers, *a: calls.append(workers) or
                        real(fn, chunks, outs, workers, *a))
    try:
        with torch.no_grad():
            got = experts_forward(x, idx, weight, gate_up, down, "rows")
    finally:
        torch.set_num_threads(threads)
    assert calls == [2 if path == "on_workers" else 0]
    torch.testing.assert_close(got, experts_loop(x, idx, weight, gate_up, down), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on_workers", [False, True])
def test_rows_adds_the_shared_experts(monkeypatch: pytest.MonkeyPatch, on_workers: bool) -> None:
    """experts_forward(shared=...) adds the shared experts; "rows" runs them as one more chunk on the CPU workers
    where it hands the routed experts to them, and in the calling thread otherwise."""
    from deepseekmoe.model import cpu_workers, experts_rows
    from deepseekmoe.model.layers import FeedForward

    x, idx, weight, gate_up, down = _problem(5, 16, 8, 12, 2, "random")
    shared = FeedForward(16, 24)
    chunk_lists = []
    real = cpu_workers.run_chunks
    monkeypatch.setattr(experts_rows, "run_chunks", lambda fn, chunks, *a: chunk_lists.append(chunks) or
                        real(fn, chunks, *a))
    threads = torch.get_num_threads()
    if on_workers:
        monkeypatch.setattr(experts_rows, "ROWS_MIN_WEIGHT_BYTES_PER_WORKER", 1)
        torch.set_num_threads(2)
    try:
        with torch.no_grad():
            got = experts_forward(x, idx, weight, gate_up, down, "rows", shared)
            ref = experts_loop(x, idx, weight, gate_up, down) + shared(x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ([shared] in chunk_lists[0]) == on_workers


def test_shared_experts_keep_their_gradient_when_only_they_train() -> None:
    """Frozen routed experts, trainable shared experts: "rows" is not taken (it has no autograd), so the shared
    experts' weights still get their gradient."""
    from deepseekmoe.model.layers import FeedForward

    x, idx, weight, gate_up, down = _problem(5, 16, 8, 12, 2, "random")
    shared = FeedForward(16, 24)
    experts_forward(x, idx, weight, gate_up, down, None, shared).sum().backward()
    ref = torch.autograd.grad(shared(x).sum(), shared.down_proj.weight)[0]
    torch.testing.assert_close(shared.down_proj.weight.grad, ref)


@pytest.mark.parametrize("strategy", ["rows", "grouped_mm", "slices"])
def test_sorted_strategies_under_cpu_autocast(strategy: str) -> None:
    """Under bf16 autocast the experts' matmuls run in bf16 and the result comes back in the input's dtype."""
    x, idx, weight, gate_up, down = _problem(40, 32, 8, 16, 2, "random")
    ref = experts_loop(x, idx, weight, gate_up, down)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts_forward(x, idx, weight, gate_up, down, strategy)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_hand_computed_single_expert() -> None:
    """One token, one expert, identity-like weights: y = w * down(silu(g) * u) by hand."""
    x = torch.tensor([[1.0, 2.0]])
    gate_up = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # F = 1: gate = x0, up = x1
    down = torch.tensor([[[1.0], [-2.0]]])              # D = 2
    h = torch.nn.functional.silu(torch.tensor(1.0)) * 2.0
    expected = 0.5 * torch.tensor([[h, -2 * h]])
    for strategy in STRATEGIES:
        y = experts_forward(x, torch.tensor([[0]]), torch.tensor([[0.5]]), gate_up, down, strategy)
        torch.testing.assert_close(y, expected, msg=strategy)


def test_no_tokens() -> None:
    x, idx, weight, gate_up, down = _problem(4, 16, 8, 12, 2, "random")
    for strategy in STRATEGIES:
        y = experts_forward(x[:0], idx[:0], weight[:0], gate_up, down, strategy)
        assert y.shape == (0, 16)


def test_chooser_and_support() -> None:
    x, idx, _, gate_up, down = _problem(*CASES["random"])
    has_gmm = hasattr(torch.nn.functional, "grouped_mm")
    assert grouped_mm_supported(x, gate_up, down) == has_gmm
    few = idx[: (PARALLEL_MIN_ROWS - 1) // idx.shape[1]]
    assert choose_strategy(x, few, gate_up, down) == ("grouped_mm" if has_gmm else "slices")
    # CPU: enough rows to split over workers go to the worker path (benchmarks/README.md)
    many = torch.zeros(PARALLEL_MIN_ROWS // 3 + 1, 3, dtype=torch.long)
    assert choose_strategy(x, many, gate_up, down) == "slices"
    # CPU without gradients: "rows" up to ROWS_MAX_PER_EXPERT rows per expert, then grouped_mm, then slices
    e = gate_up.shape[0]
    decode = torch.zeros(ROWS_MAX_PER_EXPERT * e // 2, 2, dtype=torch.long)
    assert choose_strategy(x, decode, gate_up, down, needs_grad=False) == "rows"
    assert choose_strategy(x, torch.zeros(decode.shape[0] + 1, 2, dtype=torch.long), gate_up, down,
                           needs_grad=False) == ("grouped_mm" if has_gmm else "slices")
    prefill = torch.zeros(NO_GRAD_SLICES_MIN_ROWS // 2, 2, dtype=torch.long)
    assert choose_strategy(x, prefill, gate_up, down, needs_grad=False) == "slices"
    odd = _problem(*CASES["odd_sizes"])
    assert not grouped_mm_supported(odd[0], odd[3], odd[4])
    assert choose_strategy(odd[0], odd[1], odd[3], odd[4]) == "slices"
    assert choose_strategy(odd[0], odd[1][:2], odd[3], odd[4], needs_grad=False) == "rows"  # plain matmuls
    with pytest.raises(ValueError, match="unknown experts strategy 'fast'"):
        experts_forward(x, idx, torch.ones(idx.shape), gate_up, down, "fast")


@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
def test_moe_block_strategy_pinned_matches_loop(strategy: str | None) -> None:
    """The whole MoE block (router + routed + shared) with a pinned strategy equals experts_impl="loop"."""
    cfg = ModelConfig(hidden_size=16, n_routed_experts=8, moe_intermediate_size=8, n_shared_experts=1,
                      num_experts_per_tok=3, experts_impl="grouped")
    torch.manual_seed(0)
    fast = MoE(cfg)
    for p in fast.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref = MoE(dataclasses.replace(cfg, experts_impl="loop"))
    ref.load_state_dict(fast.state_dict())
    assert isinstance(fast.experts, RoutedExperts)
    fast.experts.strategy = strategy
    x = torch.randn(2, 5, 16)
    outs = []
    for m in (ref, fast):
        xg = x.clone().requires_grad_()
        y, _ = m(xg)
        y.square().sum().backward()
        outs.append([y, xg.grad, m.experts.gate_up_proj.grad, m.gate.weight.grad])
    for r, g in zip(*outs):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_slices_split_over_cpu_workers_matches_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """With several intra-op threads the experts run as chunks on worker threads; same numbers."""
    from deepseekmoe.model import experts

    monkeypatch.setattr(experts, "MIN_ROWS_PER_WORKER", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        problem = _problem(30, 16, 8, 12, 3, "random")
        assert experts._num_workers(problem[0], 90, 0) == 2
        ref, got = _run("loop", *problem), _run("slices", *problem)
        assert torch.get_num_threads() == 2  # the workers' single-thread setting does not leak here
    finally:
        torch.set_num_threads(threads)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_chunks_match_loop(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """Chunks of experts with few rows each run as grouped GEMMs over their expert range, including experts in
    the middle of the range that got no rows; outputs and gradients equal the loop."""
    from deepseekmoe.model import experts

    x, idx, weight, gate_up, down = _problem(19, 16, 12, 12, 3, "random")
    idx = torch.where(idx == 4, 9, idx)  # expert 4 gets no rows, between used experts
    if not grouped_mm_supported(x, gate_up, down):
        pytest.skip("grouped_mm unavailable")
    monkeypatch.setattr(experts, "GROUPED_CHUNK_MAX_ROWS_PER_EXPERT", 1000)
    monkeypatch.setattr(experts, "MIN_ROWS_PER_WORKER", 8)
    calls = []
    real = experts._forward_chunk_grouped
    monkeypatch.setattr(experts, "_forward_chunk_grouped", lambda groups, *a: calls.append(groups) or real(groups, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run("slices", x, idx, weight, gate_up, down)
    finally:
        torch.set_num_threads(before)
    ref = _run("loop", x, idx, weight, gate_up, down)
    # one chunk in the calling thread, or a few per worker
    assert len(calls) == 1 if threads == 1 else 1 < len(calls) <= 2 * experts.GROUPED_CHUNKS_PER_WORKER
    assert threads == 2 or calls[0][-1][0] - calls[0][0][0] + 1 > len(calls[0])  # spans the unused expert 4
    for name, r, g in zip(["y", "d_x", "d_weight", "d_gate_up", "d_down"], ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


def test_split_balances_rows() -> None:
    from deepseekmoe.model.experts import _split

    groups = [(0, 0, 10), (1, 10, 20), (3, 20, 25), (5, 25, 40)]
    assert _split(groups, 2) == [groups[:2], groups[2:]]
    assert _split(groups, 1) == [groups]
    assert _split(groups, 0) == [groups]
    assert sum(_split(groups, 3), []) == groups
    assert _split(groups, 8) == [[g] for g in groups]  # never an empty run


def test_cpu_workers_keep_one_intra_op_thread() -> None:
    """Each expert worker runs its ops on one thread, also after ops that set up OpenMP (a worker that took the
    caller's thread count would fork a team of its own: 2 workers x 2 threads on 2 cores)."""
    from deepseekmoe.model.cpu_workers import run_chunks

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def fn(chunk, out):
            out.add_(torch.ones(1 << 16).sum())  # a parallel op, then the count it ran under
            return torch.get_num_threads()
        counts = run_chunks(fn, [[i] for i in range(4)], [torch.zeros(1), torch.zeros(1)], 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert counts == [1, 1, 1, 1]


def test_releasing_the_openmp_team_keeps_the_thread_count() -> None:
    """Before the workers start, the caller's OpenMP threads are let go (they would spin on a core the workers
    need); the runtime is found on Linux builds, the caller keeps its thread count, and parallel ops still work."""
    import sys

    from deepseekmoe.model import cpu_workers

    if sys.platform.startswith("linux"):
        assert cpu_workers._OPENMP_PAUSE is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(256, 256)
        ref = a @ a
        cpu_workers.release_openmp_team()
        assert torch.get_num_threads() == 2
        torch.testing.assert_close(a @ a, ref)
    finally:
        torch.set_num_threads(threads)


def test_run_chunks_runs_every_chunk_once_in_order_on_each_workers_own_buffer() -> None:
    """Workers take chunks as they finish: every chunk runs exactly once, results come back in chunk order, and
    each worker accumulates into its own buffer (so the sum over the buffers is the sum over the chunks)."""
    import threading

    from deepseekmoe.model.cpu_workers import run_chunks

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        others_done = threading.Event()

        def fn(chunk, out, scale):
            if chunk[0] == 0 and threading.current_thread() is not threading.main_thread():
                assert others_done.wait(30)  # a slow chunk: the other worker takes all the rest meanwhile
            seen.append(chunk[0])
            if len(seen) == 7:
                others_done.set()
            out += chunk[0] * scale
            return (chunk[0], threading.current_thread().name)
        chunks = [[i] for i in range(8)]
        outs = [torch.zeros(3), torch.zeros(3)]
        results = run_chunks(fn, chunks, outs, 2, 2.0)
        serial = run_chunks(fn, chunks, [torch.zeros(3)], 0, 2.0)
    finally:
        torch.set_num_threads(threads)
    assert [r[0] for r in results] == list(range(8)) and sorted(seen[:8]) == list(range(8))
    assert sum(r[1] != results[0][1] for r in results) == 7  # the slow worker did chunk 0 only
    torch.testing.assert_close(outs[0] + outs[1], torch.full((3,), 2.0 * sum(range(8))))
    assert {name for _, name in serial} == {threading.current_thread().name}
