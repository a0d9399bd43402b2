"""The CPU runtime's threads: large matmuls and the cross-entropy in row blocks on the workers (and the calling
thread), the calling thread's intra-op count."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepseekmoe import Transformer
from deepseekmoe.losses import lm_loss, total_loss
from deepseekmoe.model.attention import Attention
from deepseekmoe.model.layers import RotaryEmbedding
from deepseekmoe.runtime import cpu, for_device, optim, rows
from deepseekmoe.runtime.cpu import CpuRuntime, current, intra_op_threads
from deepseekmoe.runtime.linear import WorkerLinear, blocks


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_blocks_cover_the_range_in_order() -> None:
    assert blocks(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert blocks(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert blocks(1, 1) == [(0, 1)]


def _linear_case(rows: int = 300, d_in: int = 48, d_out: int = 70):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, d_in, generator=g), torch.randn(d_out, d_in, generator=g), \
        torch.randn(rows, d_out, generator=g)


def _split_linear(runtime: CpuRuntime, x, w, dy):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    runtime.attach(layer)
    assert type(layer) is WorkerLinear
    xg = x.clone().requires_grad_()
    y = layer(xg.view(3, -1, x.shape[1]))  # any leading shape
    y.backward(dy.view(3, -1, dy.shape[1]))
    return y.detach().reshape(dy.shape), xg.grad, layer.weight.grad


def test_worker_linear_matches_f_linear_and_repeats_bit_for_bit() -> None:
    x, w, dy = _linear_case()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = F.linear(xr, wr)
    y_ref.backward(dy)
    with CpuRuntime(2, min_linear_work=0) as runtime:
        first = _split_linear(runtime, x, w, dy)
        again = _split_linear(runtime, x, w, dy)
    for got, want in zip(first, (y_ref.detach(), xr.grad, wr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_worker_linear_without_grad_and_below_the_threshold() -> None:
    x, w, _ = _linear_case()
    with CpuRuntime(2, min_linear_work=0) as split, CpuRuntime(2) as inline:
        for runtime in (split, inline):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                layer.weight.copy_(w)
            runtime.attach(layer)
            with torch.inference_mode():
                torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer(x[:3]), F.linear(x[:3], w), rtol=1e-5, atol=1e-5)
            CpuRuntime.remove(layer)
            assert type(layer) is nn.Linear and not hasattr(layer, "runtime")


def test_apply_lowers_the_callers_threads_until_the_last_runtime_closes(two_threads, monkeypatch) -> None:
    monkeypatch.delenv("DEEPSEEKMOE_CALLER_THREADS", raising=False)
    a = CpuRuntime.apply(nn.Linear(4, 4, bias=False))
    b = CpuRuntime.apply(nn.Linear(4, 4, bias=False))
    assert torch.get_num_threads() == 1 and intra_op_threads() == 2
    assert a.workers == b.workers == 2
    a.close()
    assert torch.get_num_threads() == 1
    b.close()
    b.close()  # twice: nothing more to put back
    assert torch.get_num_threads() == 2 and intra_op_threads() == 2


def test_a_dropped_runtime_puts_the_threads_back(two_threads, monkeypatch) -> None:
    monkeypatch.delenv("DEEPSEEKMOE_CALLER_THREADS", raising=False)
    layer = nn.Linear(4, 4, bias=False)
    CpuRuntime.apply(layer)
    assert torch.get_num_threads() == 1
    del layer
    assert torch.get_num_threads() == 2


def test_caller_threads_from_the_environment(two_threads, monkeypatch) -> None:
    monkeypatch.setenv("DEEPSEEKMOE_CALLER_THREADS", "2")
    with CpuRuntime.apply(nn.Linear(4, 4, bias=False)):
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("DEEPSEEKMOE_CALLER_THREADS", "two")
    with pytest.raises(ValueError, match="DEEPSEEKMOE_CALLER_THREADS='two'"):
        CpuRuntime.apply(nn.Linear(4, 4, bias=False))


@pytest.mark.parametrize("moe", [True, False])
def test_training_with_the_runtime_repeats_and_matches_without(make_config, two_threads, moe: bool) -> None:
    cfg = make_config() if moe else make_config(router="none", n_routed_experts=None, n_shared_experts=0)
    ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))

    def losses(runtime: bool, min_linear_work: int = 0) -> list[float]:
        torch.manual_seed(0)
        model = Transformer(cfg)
        rt = CpuRuntime.apply(model, min_linear_work=min_linear_work, min_expert_work=0) if runtime else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = []
        for _ in range(3):
            o = model(ids[:, :-1])
            loss = total_loss(o.logits, ids[:, 1:], o.router_outputs, cfg).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out.append(loss.item())
        if rt is not None:
            rt.close()
        return out
    first = losses(True)
    assert losses(True) == first  # bit for bit
    torch.testing.assert_close(torch.tensor(first), torch.tensor(losses(False)), rtol=1e-5, atol=0)


def test_for_device_applies_to_dense_models_too(make_config, two_threads) -> None:
    model = Transformer(make_config(router="none", n_routed_experts=None, n_shared_experts=0))
    runtime = for_device(model, "cpu")
    assert isinstance(runtime, CpuRuntime)
    assert type(model.lm_head) is WorkerLinear
    runtime.close()


def test_parts_run_on_the_calling_thread_too_when_it_runs_one_intra_op_thread(two_threads) -> None:
    """With the caller at one intra-op thread it takes parts as a worker does (and as many threads work as there
    are workers); with more it only waits, so a part's bits never depend on who ran it."""
    for caller_threads, caller_works in ((1, True), (2, False)):
        with CpuRuntime(2, caller_threads=caller_threads) as runtime:
            seen: list[tuple[str, bool]] = []
            lock = threading.Lock()

            def part() -> None:
                time.sleep(0.01)  # long enough that every thread taking parts gets one
                with lock:
                    seen.append((threading.current_thread().name, runtime.in_worker()))
            runtime.run_parts([part] * 8)
            names = {name for name, _ in seen}
            assert len(seen) == 8 and all(flag for _, flag in seen)
            assert (threading.current_thread().name in names) == caller_works
            assert len(names) == 2  # never more threads at work than workers
            assert not runtime.in_worker()  # the caller's flag is put back
            seen.clear()
            with runtime.in_calling_thread():  # the memory profile's one thread
                runtime.run_parts([part] * 4)
            assert {name for name, _ in seen} == {threading.current_thread().name}


@pytest.mark.parametrize("ignore", [False, True])
def test_split_cross_entropy_has_the_bits_of_f_cross_entropy(monkeypatch, ignore: bool) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50, generator=g) * 3
    targets = torch.randint(0, 50, (37,), generator=g)
    if ignore:
        targets[::3] = -100
    ref_in = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in, targets, ignore_index=-100)
    ref.backward()
    monkeypatch.setattr(rows, "MIN_LOSS_ELEMENTS", 0)
    with CpuRuntime(2, caller_threads=1) as runtime:
        calls = []
        monkeypatch.setattr(runtime, "run_parts", lambda parts: calls.append(len(parts)) or
                            CpuRuntime.run_parts(runtime, parts))
        got_in = logits.clone().requires_grad_()
        got = rows.cross_entropy(runtime, got_in, targets)
        got.backward()
    assert calls == [8, 8]  # forward and backward, in row blocks
    assert torch.equal(got, ref) and torch.equal(got_in.grad, ref_in.grad)


def test_lm_loss_hands_the_cross_entropy_to_the_open_runtime(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "_open", [])  # runtimes other tests left open
    monkeypatch.setattr(rows, "MIN_LOSS_ELEMENTS", 0)
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    taken = []
    monkeypatch.setattr(rows._SplitCrossEntropy, "apply", lambda *a: taken.append(a[3]) or torch.tensor(0.0))
    lm_loss(logits, targets)
    assert taken == []
    with CpuRuntime(2) as runtime:
        assert current() is runtime
        lm_loss(logits, targets)
    assert taken == [runtime] and current() is None


@pytest.mark.parametrize("batch", [4, 1])  # blocks of sequences; of heads for one sequence
def test_worker_attention_has_the_bits_of_sdpa_forward_and_backward(make_config, monkeypatch, batch: int) -> None:
    monkeypatch.setattr(rows, "MIN_ATTENTION_WORK", 0)
    cfg = make_config()
    torch.manual_seed(0)
    plain = Attention(cfg)
    split = Attention(cfg)
    split.load_state_dict(plain.state_dict())
    x = torch.randn(batch, 24, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = RotaryEmbedding(cfg.head_dim, 64, cfg.rope_theta)(torch.arange(24))
    with CpuRuntime(2, caller_threads=1) as runtime:
        runtime.attach(split)
        assert type(split) is rows.WorkerAttention
        taken, apply = [], rows._SplitAttention.apply
        monkeypatch.setattr(rows._SplitAttention, "apply", lambda *a: taken.append(a[3]) or apply(*a))
        results = []
        for layer in (plain, split):
            xg = x.clone().requires_grad_()
            y = layer(xg, cos, sin)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), xg.grad, *(p.grad for p in layer.parameters())))
        assert taken == [0 if batch > 1 else 1]
        # masked and cached calls take the plain path
        with torch.no_grad():
            split(x, cos, sin, key_mask=torch.ones(batch, 24, dtype=torch.bool))
        assert len(taken) == 1
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)
    CpuRuntime.remove(split)
    assert type(split) is Attention and not hasattr(split, "runtime")


def _optimizer_run(attach: bool, make, steps: int = 3, hook: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.Linear(300, 40), nn.LayerNorm(40))
    opt = make([{"params": [model[0].weight, model[1].weight], "weight_decay": 0.1},
                {"params": [model[0].bias, model[1].bias, *model[2].parameters()], "weight_decay": 0.0}])
    if hook:
        opt.register_step_post_hook(lambda *_: None)
    with CpuRuntime(2, caller_threads=1) as runtime:
        parted = attach and runtime.attach_optimizer(opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
            sched.step()
    return parted, [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize("piece", [1 << 18, 64], ids=["whole", "pieces"])
@pytest.mark.parametrize("make", [lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95)),
                                  lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True),
                                  lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9)], ids=["adamw", "amsgrad", "sgd"])
def test_an_optimizer_step_in_parts_has_the_bits_of_one_step(monkeypatch, make, piece) -> None:
    """Whole parameters a part, or (after the first step) flat pieces of 64 elements: 19,200 and 12,000 elements
    of weights (the second ending in half a piece) and 300 of a bias; the step count stepped once."""
    monkeypatch.setattr(optim, "MIN_STEP_ELEMENTS", 0)
    monkeypatch.setattr(optim, "PIECE_ELEMENTS", piece)
    monkeypatch.setattr(optim, "CUT_FROM_ELEMENTS", 0)
    seen, cut = [], []

    def parts(o, n, parts=optim._parts):
        r = parts(o, n)
        seen.append(len(r))
        cut.append(sum(p.end is not None for part in r for p in part))
        return r
    monkeypatch.setattr(optim, "_parts", parts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler sees the step it wraps called
        parted, params, state = _optimizer_run(True, make)
    assert parted and len(seen) == 3 and min(seen) >= 2  # every step in parts
    assert cut == ([0, 0, 0] if piece > 20000 else [0, 300 + 188 + 5, 300 + 188 + 5])  # the first step makes the state
    _, want_params, want_state = _optimizer_run(False, make)
    for a, b in zip(params, want_params):
        assert torch.equal(a, b)
    assert state["param_groups"] == want_state["param_groups"]
    for k, s in want_state["state"].items():
        for name, value in s.items():
            assert torch.equal(state["state"][k][name], value), name


def test_an_optimizer_step_stays_whole_with_hooks_or_off_the_cpu_types(monkeypatch) -> None:
    monkeypatch.setattr(optim, "MIN_STEP_ELEMENTS", 0)
    monkeypatch.setattr(optim, "_parts", lambda *a: pytest.fail("cut into parts"))
    make = lambda g: torch.optim.AdamW(g, lr=1e-2)  # noqa: E731
    parted, params, _ = _optimizer_run(True, make, hook=True)
    assert parted
    for a, b in zip(params, _optimizer_run(False, make)[1]):
        assert torch.equal(a, b)
    assert not _optimizer_run(True, lambda g: torch.optim.Adagrad(g, lr=1e-2))[0]


_FAULTS = """
import resource, sys, torch
from deepseekmoe.runtime import cpu
cpu.KEEP_FREED_MAX_PARAMETER_BYTES = int(sys.argv[1])
kept = cpu.keep_freed_memory(torch.nn.Linear(16, 16))  # 1,088 bytes of parameters
faults = []
for step in range(10):  # two 64 MB buffers a "step", freed at its end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.empty(1 << 24).fill_(1.0), torch.empty(1 << 24).fill_(2.0)
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[-3:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    """Two 64 MB buffers allocated and freed a step: 32,768 first-touch page faults a step with glibc's defaults;
    once the runtime keeps freed memory, none after the first few steps (the heap's freed blocks, merged, serve
    the next step's); DEEPSEEKMOE_KEEP_FREED_MEMORY=0 and a model above KEEP_FREED_MAX_PARAMETER_BYTES keep the
    defaults."""
    def run(limit: int = 1 << 30, **env: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, str(limit)], capture_output=True, text=True,
                             check=True, env={**os.environ, **env}).stdout.split()
        return out[0], int(out[1])
    kept, faults = run()
    assert kept == "True" and faults < 1000
    for default, default_faults in (run(DEEPSEEKMOE_KEEP_FREED_MEMORY="0"), run(limit=1000)):
        assert default == "False" and default_faults > 10_000
