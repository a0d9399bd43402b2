"""The CPU runtime's threads: large matmuls in row blocks on the workers, the calling thread's intra-op count, the
gauge that moves hand-offs into the calling thread (the same bits either way)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepseekmoe import Transformer
from deepseekmoe.losses import total_loss
from deepseekmoe.runtime import for_device
from deepseekmoe.runtime.cpu import CpuRuntime, intra_op_threads
from deepseekmoe.runtime.gauge import BACK_OFF_S, WORTH, Gauge
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


def test_gauge_keeps_work_in_the_caller_while_handing_off_does_not_pay() -> None:
    now = [0.0]
    gauge = Gauge(2, clock=lambda: now[0])
    assert gauge.wide()
    gauge.record(cpu_s=0.019, wall_s=0.010)  # both workers busy the whole time: 1.9x
    assert gauge.wide() and gauge.speedup > WORTH
    for _ in range(4):  # a worker waiting for a core: the hand-offs take longer than one thread alone
        gauge.record(cpu_s=0.010, wall_s=0.020)
    assert gauge.speedup < WORTH and not gauge.wide()
    now[0] += BACK_OFF_S / 2
    assert not gauge.wide()
    now[0] += BACK_OFF_S
    assert gauge.wide()  # measure afresh: the old, slow hand-offs are forgotten
    gauge.record(cpu_s=0.018, wall_s=0.010)
    assert gauge.speedup == pytest.approx(1.8) and gauge.wide()


def test_parts_run_in_the_calling_thread_while_the_gauge_says_so(two_threads, monkeypatch) -> None:
    monkeypatch.delenv("DEEPSEEKMOE_CALLER_THREADS", raising=False)
    with CpuRuntime.apply(nn.Linear(4, 4, bias=False)) as runtime:
        where: list[bool] = []
        for wide in (True, False):
            monkeypatch.setattr(runtime.gauge, "wide", lambda wide=wide: wide)
            where.clear()
            runtime.run_parts([lambda: where.append(runtime.in_worker()) for _ in range(8)])
            assert where == [wide] * 8
    with CpuRuntime(2) as runtime:  # the caller at two intra-op threads: always the workers
        monkeypatch.setattr(runtime.gauge, "wide", lambda: False)
        where.clear()
        runtime.run_parts([lambda: where.append(runtime.in_worker()) for _ in range(4)])
        assert where == [True] * 4


@pytest.mark.parametrize("moe", [True, False])
def test_training_gives_the_same_bits_on_the_workers_and_in_the_caller(make_config, two_threads, monkeypatch,
                                                                       moe: bool) -> None:
    """The gauge may move any hand-off into the calling thread: losses and weights stay the same bits."""
    monkeypatch.delenv("DEEPSEEKMOE_CALLER_THREADS", raising=False)
    cfg = make_config() if moe else make_config(router="none", n_routed_experts=None, n_shared_experts=0)
    ids = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))

    def run(wide) -> tuple[list[float], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        with CpuRuntime.apply(model, min_linear_work=0, min_expert_work=0) as runtime:
            monkeypatch.setattr(runtime.gauge, "wide", wide)
            for _ in range(3):
                o = model(ids[:, :-1])
                loss = total_loss(o.logits, ids[:, 1:], o.router_outputs, cfg).total
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]
    flip = iter(range(10**6))
    runs = [run(lambda: True), run(lambda: False), run(lambda: next(flip) % 3 == 0)]
    for losses, weights in runs[1:]:
        assert losses == runs[0][0]
        assert all(torch.equal(a, b) for a, b in zip(weights, runs[0][1]))
