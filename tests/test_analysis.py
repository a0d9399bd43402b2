"""Routing statistics on hand-made RouterOutputs, re-routing experiments, analysis plots."""

import json
import math

import pytest
import torch

from deepseekmoe import ModelConfig, RouterOutput, Transformer
from deepseekmoe.analysis import analyze as analyze_mod
from deepseekmoe.analysis.specialization import (
    disable_top_experts, evaluate_loss, reroute, rerouted, shared_expert_swap, vary_top_k)
from deepseekmoe.analysis.stats import LayerRoutingStats, RoutingStats
from deepseekmoe.commands.analyze import analyze_command


def _routing(idx, probs=None, batch_size=1):
    idx_TK = torch.tensor(idx)
    e = 5 if probs is None else len(probs[0])
    counts = torch.bincount(idx_TK.reshape(-1), minlength=e)
    p = None if probs is None else torch.tensor(probs, dtype=torch.float32)
    return RouterOutput(idx_TK, torch.ones(idx_TK.shape), p, None, counts, batch_size)


# tokens 0..3 choose two of five experts; expert 4 is never chosen; load = [4, 2, 1, 1, 0]
IDX = [[0, 1], [0, 2], [1, 0], [3, 0]]


def test_load_statistics_hand_case():
    s = LayerRoutingStats(5)
    s.update(_routing(IDX))
    assert s.load_E.tolist() == [4, 2, 1, 1, 0]
    assert s.max_over_mean() == pytest.approx(4 / 1.6)
    assert s.cv() == pytest.approx(math.sqrt(9.2 / 5) / 1.6)  # sum of squared deviations from 1.6 is 9.2
    assert s.load_entropy() == pytest.approx(1.75 * math.log(2))  # shares 1/2, 1/4, 1/8, 1/8
    assert s.dead_experts() == [4]
    assert s.token_entropy() is None  # no probabilities given


def test_gate_mass_is_the_mean_summed_top_k_weight():
    s = LayerRoutingStats(4)
    counts = torch.tensor([2, 1, 1, 0])
    s.update(RouterOutput(torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0.5, 0.25], [0.125, 0.125]]), None, None,
                          counts, 1))
    assert s.gate_mass() == pytest.approx((0.75 + 0.25) / 2)
    assert s.summary()["gate_mass"] == pytest.approx(0.5)


def test_coactivation_counts_exactly():
    s = LayerRoutingStats(5)
    s.update(_routing(IDX))
    expected = torch.zeros(5, 5, dtype=torch.long)
    for a, b in IDX:
        expected[a, b] += 1
        expected[b, a] += 1
    expected += torch.diag(torch.tensor([4, 2, 1, 1, 0]))
    assert torch.equal(s.coactivation_EE, expected)
    assert s.coactivation_EE[0, 1] == 2 and s.coactivation_EE[0, 3] == 1 and s.coactivation_EE[2, 3] == 0


def test_token_entropy_is_mean_per_token_entropy():
    uniform, onehot = [0.25] * 4, [1.0, 0.0, 0.0, 0.0]
    s = LayerRoutingStats(4)
    s.update(_routing([[0], [0]], [uniform, onehot]))
    assert s.token_entropy() == pytest.approx(math.log(4) / 2)


def test_accumulating_batches_equals_one_batch_and_top_tokens():
    ids = torch.tensor([7, 7, 9, 7])
    one = LayerRoutingStats(5, vocab_size=10)
    one.update(_routing(IDX), ids)
    two = LayerRoutingStats(5, vocab_size=10)
    two.update(_routing(IDX[:2]), ids[:2])
    two.update(_routing(IDX[2:]), ids[2:])
    assert one.summary() == two.summary()
    # token 7 occurs 3 times, always routed to expert 0; token 9 once, to experts 1 and 0
    assert one.top_tokens(0, n=5, min_count=1) == [(7, 3, 1.0), (9, 1, 1.0)]
    assert one.top_tokens(1, n=5, min_count=1) == [(9, 1, 1.0), (7, 1, pytest.approx(1 / 3))]
    assert one.top_tokens(1, n=5, min_count=2) == [(7, 1, pytest.approx(1 / 3))]
    summary = one.summary(decode=lambda i: f"<{i}>", min_count=1)
    assert summary["top_tokens"][3] == [{"id": 7, "text": "<7>", "count": 1, "share": 0.3333}]
    json.dumps(summary)  # JSON-ready


def test_routing_stats_checks_layer_count():
    with pytest.raises(ValueError, match="2 router outputs for 3 MoE layers"):
        RoutingStats(5, 3).update([_routing(IDX), _routing(IDX)])


# ------------------------------------------------------------------ re-routing
def test_reroute_disables_top_one_of_four_hand_case():
    probs = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.5, 0.05, 0.25, 0.2]])
    r = reroute(probs, num_disabled=1, top_k=2)
    assert r.topk_idx_TK.tolist() == [[2, 3], [2, 3]]
    assert torch.allclose(r.topk_weight_TK, torch.tensor([[0.3, 0.2], [0.25, 0.2]]))
    assert r.expert_counts_E.tolist() == [0, 0, 2, 2]
    with pytest.raises(ValueError, match="cannot disable 3"):
        reroute(probs, num_disabled=3, top_k=2)


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=kw.pop("vocab_size", 64), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32, intermediate_size=64, moe_intermediate_size=16,
                      n_routed_experts=kw.pop("n_routed_experts", 8), n_shared_experts=kw.pop("n_shared_experts", 1),
                      num_experts_per_tok=kw.pop("num_experts_per_tok", 3), initializer_range=0.2, **kw)
    return Transformer(cfg).eval()


def _batches(n=2, b=2, s=12, vocab=64):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        t = torch.randint(0, vocab, (b, s + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def test_ratio_zero_and_model_k_equal_the_normal_forward():
    model = _tiny()
    x = _batches(1)[0][0]
    with torch.no_grad():
        ref = model(x)
        with rerouted(model, disable_ratio=0.0):
            a = model(x)
        with rerouted(model, top_k=model.config.num_experts_per_tok):
            b = model(x)
    for out in (a, b):
        assert torch.allclose(out.logits, ref.logits, atol=1e-6)
        for r, r0 in zip(out.router_outputs, ref.router_outputs):
            assert torch.equal(r.topk_idx_TK, r0.topk_idx_TK)


def test_rerouted_model_disables_each_tokens_top_expert_and_restores():
    model = _tiny(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0)
    x = _batches(1)[0][0]
    with torch.no_grad():
        ref = model(x)
        with rerouted(model, disable_ratio=1 / 4):  # round(4/4) = 1 expert disabled per token
            out = model(x)
        after = model(x)
    # layer 0 sees the same input; later layers see inputs already changed by the re-routing upstream
    assert torch.equal(out.router_outputs[0].probs_TE, ref.router_outputs[0].probs_TE)
    for r in out.router_outputs:
        ranked = torch.argsort(r.probs_TE, dim=-1, descending=True)
        assert torch.equal(r.topk_idx_TK, ranked[:, 1:3])
        assert torch.allclose(r.topk_weight_TK, r.probs_TE.gather(1, ranked[:, 1:3]))
    assert not torch.allclose(out.logits, ref.logits)
    assert torch.equal(after.logits, ref.logits)
    assert all("forward" not in vars(m.gate) for m in model.moe_layers())


def test_shared_off_plus_one_routed_expert_is_what_the_layer_computes():
    model = _tiny()
    moe = model.moe_layers()[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), rerouted(model, top_k=4, disable_shared=True):
        y, r = moe(x)
    with torch.no_grad():
        r0 = moe.gate(x.reshape(10, 32), batch_size=2)
        weight_TK, idx_TK = torch.topk(r0.probs_TE, 4)
        expected = moe.experts(x.reshape(10, 32), idx_TK, weight_TK)  # routed only, no shared expert
    assert r.top_k == 4
    assert torch.allclose(y.reshape(10, 32), expected, atol=1e-6)
    assert "forward" not in vars(moe.shared_experts)


def test_experiments_report_losses_and_refuse_hash_and_dense():
    model = _tiny()
    batches = _batches()
    base = evaluate_loss(model, batches)
    fig4 = disable_top_experts(model, batches, ratios=(0, 1 / 8, 2 / 8))
    assert [r["num_disabled"] for r in fig4] == [0, 1, 2]
    assert fig4[0]["loss"] == pytest.approx(base, abs=1e-6)
    fig5 = vary_top_k(model, batches)
    assert [r["top_k"] for r in fig5] == [1, 2, 3] and fig5[-1]["loss"] == pytest.approx(base, abs=1e-6)
    swap = shared_expert_swap(model, batches)
    assert swap["routed_top_k"] == 4 and swap["normal_loss"] == pytest.approx(base)
    with pytest.raises(ValueError, match="hash router"):
        with rerouted(_tiny(router="hash", num_experts_per_tok=1, n_shared_experts=0)):
            pass
    with pytest.raises(ValueError, match="no shared experts"):
        with rerouted(_tiny(n_shared_experts=0), disable_shared=True):
            pass


def test_analyze_model_writes_json_ready_results_and_plots(tmp_path):
    model = _tiny()
    result = analyze_mod.analyze_model(model, _batches(), decode=lambda i: f"t{i}", top_tokens=3)
    assert len(result["layers"]) == 2 and sum(result["layers"][0]["load"]) == 2 * 2 * 12 * 3
    assert result["disable_top"][0]["ratio"] == 0 and "shared_swap" in result
    dense = analyze_mod.analyze_model(_tiny(router="none", n_routed_experts=None, n_shared_experts=0,
                                            num_experts_per_tok=1), _batches())
    assert dense["layers"] == [] and "skipped" in dense
    results = [{"name": "run/step_1", **result}, {"name": "dense", **dense}]
    files = analyze_mod.write_routing_plots(json.loads(json.dumps(results)), tmp_path)
    assert set(files.values()) == {"run_step_1_load.png", "run_step_1_coactivation.png",
                                   "fig4_disable_top.png", "fig5_top_k.png"}
    for name in files.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_command_on_two_checkpoints(tmp_path):
    from deepseekmoe.checkpoint import save_model
    from train_helpers import make_data_dir

    data = make_data_dir(tmp_path / "data")
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    a = save_model(_tiny(vocab_size=vocab), tmp_path / "runA" / "checkpoints" / "step_00000010",
                   data / "tokenizer.json")
    b = save_model(_tiny(vocab_size=vocab, router="gshard", num_experts_per_tok=2, n_shared_experts=0),
                   tmp_path / "gshard", data / "tokenizer.json")
    out = tmp_path / "out"
    assert analyze_command([str(tmp_path / "runA"), str(b)], data=str(data), out=str(out),
                                       batches=2, batch_size=2, seq_len=16) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert [c["name"] for c in report["checkpoints"]] == ["runA/step_00000010", "gshard"]
    assert report["checkpoints"][0]["checkpoint"] == str(a) and report["seq_len"] == 16
    assert "shared_swap" in report["checkpoints"][0] and "shared_swap" not in report["checkpoints"][1]
    texts = [t["text"] for e in report["checkpoints"][0]["layers"][0]["top_tokens"] for t in e]
    assert texts and all(isinstance(t, str) for t in texts)  # decoded with the tokenizer
    assert (out / "fig4_disable_top.png").is_file() and (out / "runA_step_00000010_load.png").is_file()
    other = tmp_path / "other.json"
    other.write_text((data / "tokenizer.json").read_text().replace('"<|pad|>"', '"<|pad2|>"'))
    save_model(_tiny(vocab_size=vocab), tmp_path / "odd", other)
    with pytest.raises(ValueError, match="different tokenizer"):
        analyze_command([str(tmp_path / "odd")], data=str(data), out=str(out), batches=1)
