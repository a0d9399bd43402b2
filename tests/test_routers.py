"""Routers: softmax top-k (DeepSeekMoE), Switch (top-1), GShard (top-2), Hash; capacity-factor token dropping."""

from __future__ import annotations

import pytest
import torch

from deepseekmoe import MoE
from deepseekmoe.model.router import HashRouter, TopKRouter, build_router


def _identity_router(make_config, num_experts: int, top_k: int, router: str = "softmax_topk", **kw) -> TopKRouter:
    """A router whose logits are the input itself (D = E, centroids = unit vectors): choices are set by hand."""
    cfg = make_config(hidden_size=num_experts, num_attention_heads=1, n_routed_experts=num_experts,
                      num_experts_per_tok=top_k, router=router, **kw)
    r = build_router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(num_experts))
    return r


def _scores(choices: list[tuple[int, ...]], num_experts: int) -> torch.Tensor:
    """Logits making choice[0] the most probable expert, choice[1] the second, ..."""
    x = torch.zeros(len(choices), num_experts)
    for t, chosen in enumerate(choices):
        for rank, e in enumerate(chosen):
            x[t, e] = 10.0 - 3.0 * rank
    return x


@pytest.mark.parametrize("router, k", [("switch", 1), ("gshard", 2), ("softmax_topk", 3)])
def test_learned_routers_pick_top_k_with_probability_gates(make_config, router, k):
    cfg = make_config(router=router, num_experts_per_tok=k, n_shared_experts=0)
    r = build_router(cfg)
    assert isinstance(r, TopKRouter) and r.top_k == k
    with torch.no_grad():
        r.weight.normal_(0, 1.0)
    x = torch.randn(10, cfg.hidden_size)
    out = r(x, batch_size=2)
    probs = torch.softmax(x @ r.weight.t(), dim=-1)
    assert out.topk_idx_TK.shape == out.topk_weight_TK.shape == (10, k)
    torch.testing.assert_close(out.probs_TE, probs)
    expected_v, expected_i = probs.topk(k, dim=-1)
    assert torch.equal(out.topk_idx_TK, expected_i)
    torch.testing.assert_close(out.topk_weight_TK, expected_v, rtol=0, atol=0)
    assert torch.equal(out.expert_counts_E, torch.bincount(expected_i.reshape(-1), minlength=8))
    assert out.num_experts == 8 and out.top_k == k and out.batch_size == 2


def test_hand_chosen_routing(make_config):
    r = _identity_router(make_config, 4, 2)
    out = r(_scores([(2, 0), (1, 3), (3, 2)], 4), batch_size=1)
    assert out.topk_idx_TK.tolist() == [[2, 0], [1, 3], [3, 2]]
    assert out.expert_counts_E.tolist() == [1, 1, 2, 2]


def test_capacity_drops_exactly_the_assignments_beyond_capacity(make_config):
    # E=4, K=2, T=4, factor 1.0 -> capacity ceil(1.0 * 4 * 2 / 4) = 2 assignments per expert.
    # First choices of all tokens take priority, then second choices, each in token order:
    #   1st: t0->0 (0's 1st), t1->0 (0's 2nd), t2->0 (0's 3rd: DROP), t3->1 (1's 1st)
    #   2nd: t0->1 (1's 2nd), t1->2 (2's 1st), t2->1 (1's 3rd: DROP), t3->0 (0's 4th: DROP)
    r = _identity_router(make_config, 4, 2, router="gshard", capacity_factor=1.0)
    x = _scores([(0, 1), (0, 2), (0, 1), (1, 0)], 4)
    out = r(x, batch_size=1)
    keep = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    probs = torch.softmax(x, dim=-1)
    torch.testing.assert_close(out.topk_weight_TK, probs.gather(1, out.topk_idx_TK) * keep, rtol=0, atol=0)
    assert out.expert_counts_E.tolist() == [2, 2, 1, 0]
    assert out.topk_idx_TK.tolist() == [[0, 1], [0, 2], [0, 1], [1, 0]]  # dropped slots keep their index


def test_capacity_top1_and_generous_factor(make_config):
    # Switch, E=2, T=4, factor 1.0 -> capacity 2: all four tokens want expert 0, the last two are dropped
    r = _identity_router(make_config, 2, 1, router="switch", capacity_factor=1.0)
    out = r(_scores([(0,), (0,), (0,), (0,)], 2), batch_size=2)
    assert (out.topk_weight_TK[:, 0] > 0).tolist() == [True, True, False, False]
    assert out.expert_counts_E.tolist() == [2, 0]
    # factor 2.0 -> capacity 4: nothing dropped
    r2 = _identity_router(make_config, 2, 1, router="switch", capacity_factor=2.0)
    out2 = r2(_scores([(0,), (0,), (0,), (0,)], 2), batch_size=2)
    assert torch.all(out2.topk_weight_TK > 0) and out2.expert_counts_E.tolist() == [4, 0]


def test_dropped_assignments_contribute_nothing_to_the_moe_output(make_config):
    cfg = make_config(router="switch", num_experts_per_tok=1, n_shared_experts=1, capacity_factor=0.5,
                      experts_impl="loop")
    moe = MoE(cfg)
    x = torch.randn(1, 16, cfg.hidden_size)
    y, r = moe(x)
    dropped = r.topk_weight_TK[:, 0] == 0
    assert dropped.any() and int(r.expert_counts_E.max()) <= 1  # capacity ceil(0.5 * 16 / 8) = 1
    x_TD = x.reshape(-1, cfg.hidden_size)
    # a dropped token gets only the shared experts (the residual passes it through in the block)
    torch.testing.assert_close(y.reshape(-1, cfg.hidden_size)[dropped], moe.shared_experts(x_TD[dropped]))


def test_hash_router_is_deterministic_and_balanced(make_config):
    cfg = make_config(router="hash", n_routed_experts=8, num_experts_per_tok=1, vocab_size=101)
    a, b = HashRouter(cfg), HashRouter(cfg)
    assert torch.equal(a.table, b.table)
    counts = torch.bincount(a.table, minlength=8)
    assert int(counts.sum()) == 101 and int(counts.max() - counts.min()) <= 1
    other = HashRouter(cfg.replace(hash_seed=1))
    assert not torch.equal(a.table, other.table)
    assert list(a.parameters()) == []  # nothing learned


def test_hash_router_routes_by_token_id_only(make_config):
    cfg = make_config(router="hash", n_routed_experts=8, num_experts_per_tok=1)
    r = HashRouter(cfg)
    ids = torch.tensor([[3, 5, 3], [96, 0, 5]])
    out1 = r(torch.randn(6, cfg.hidden_size), batch_size=2, input_ids=ids)
    out2 = r(torch.randn(6, cfg.hidden_size), batch_size=2, input_ids=ids)
    assert torch.equal(out1.topk_idx_TK, out2.topk_idx_TK)
    assert out1.topk_idx_TK[:, 0].tolist() == [int(r.table[i]) for i in ids.reshape(-1)]
    assert torch.all(out1.topk_weight_TK == 1.0) and out1.topk_weight_TK.dtype == torch.float32
    assert out1.probs_TE is None and out1.logits_TE is None
    assert out1.expert_counts_E.tolist() == torch.bincount(out1.topk_idx_TK[:, 0], minlength=8).tolist()


def test_hash_router_needs_input_ids(make_config):
    cfg = make_config(router="hash", n_routed_experts=8, num_experts_per_tok=1)
    moe = MoE(cfg)
    with pytest.raises(ValueError, match=r"hash router needs the token ids: call MoE\(x, input_ids=...\)"):
        moe(torch.randn(1, 3, cfg.hidden_size))
    y, r = moe(torch.randn(1, 3, cfg.hidden_size), input_ids=torch.tensor([[1, 2, 3]]))
    assert y.shape == (1, 3, cfg.hidden_size)


def test_hash_table_survives_meta_init(make_config):
    from deepseekmoe import Transformer

    cfg = make_config(router="hash", n_routed_experts=8, num_experts_per_tok=1)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.layers[0].mlp.gate.table, HashRouter(cfg).table)


def test_dense_config_has_no_router(make_config):
    cfg = make_config(router="none", n_routed_experts=None)
    with pytest.raises(ValueError, match="router='none' has no routed experts"):
        build_router(cfg)


def test_capacity_routing_depends_on_later_tokens_dropless_does_not(make_config):
    """Documented behaviour: with a capacity, a later token's first choice can drop an earlier token's second."""
    r = _identity_router(make_config, 4, 2, router="gshard", capacity_factor=0.5)  # capacity ceil(0.5*2*2/4) = 1
    early = (1, 0)
    alone = r(_scores([early, (2, 3)], 4), batch_size=1).topk_weight_TK[0]
    crowded = r(_scores([early, (0, 3)], 4), batch_size=1).topk_weight_TK[0]
    assert alone[1] > 0 and crowded[1] == 0  # token 0's second choice (expert 0) lost to token 1's first
    dropless = _identity_router(make_config, 4, 2, router="gshard")
    a = dropless(_scores([early, (2, 3)], 4), batch_size=1).topk_weight_TK[0]
    b = dropless(_scores([early, (0, 3)], 4), batch_size=1).topk_weight_TK[0]
    assert torch.equal(a, b)


def test_hash_layers_use_different_tables(make_config):
    from deepseekmoe import Transformer

    cfg = make_config(router="hash", n_routed_experts=8, num_experts_per_tok=1, num_hidden_layers=3)
    model = Transformer(cfg)
    tables = [layer.mlp.gate.table for layer in model.layers]
    assert torch.equal(tables[1], HashRouter(cfg, layer_idx=1).table)
    assert not torch.equal(tables[0], tables[1]) and not torch.equal(tables[1], tables[2])
