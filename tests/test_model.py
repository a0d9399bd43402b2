"""MoE layer and Transformer: DESIGN.md must-haves 1 and 3, a from-scratch reference of the paper's Eqs. 9-11,
and the Transformer's shapes, layer pattern, tied embeddings, GQA and causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseekmoe import MoE, Transformer
from deepseekmoe.model.init import init_weights, reset_tables
from deepseekmoe.model.layers import FeedForward

IMPLS = ["loop", "grouped"]


def _swiglu(x, gate_w, up_w, down_w):
    return (F.silu(x @ gate_w.t()) * (x @ up_w.t())) @ down_w.t()


def reference_moe(moe: MoE, cfg, x: torch.Tensor) -> torch.Tensor:
    """Paper Eqs. 9-11 with plain torch ops: every expert on every token, gates zero outside the top-K."""
    d, f, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    u = x.reshape(-1, d)
    s = torch.softmax(u @ moe.gate.weight.t(), dim=-1)                  # s_{i,t} over the routed experts
    top_v, top_i = s.topk(k, dim=-1)
    g = torch.zeros_like(s).scatter(1, top_i, top_v)                    # g_{i,t} = s_{i,t} if in TopK else 0
    if cfg.norm_topk_prob:
        g = g / g.sum(dim=-1, keepdim=True)
    h = torch.zeros_like(u)
    for i in range(cfg.n_routed_experts):                               # sum_i g_{i,t} FFN_i(u_t)
        w = moe.experts.gate_up_proj[i]
        h = h + g[:, i:i + 1] * _swiglu(u, w[:f], w[f:], moe.experts.down_proj[i])
    for j in range(cfg.n_shared_experts):                               # + sum of K_s separate shared FFNs
        sh, cols = moe.shared_experts, slice(j * f, (j + 1) * f)
        h = h + _swiglu(u, sh.gate_proj.weight[cols], sh.up_proj.weight[cols], sh.down_proj.weight[:, cols])
    return h.view_as(x)


# ------------------------------------------------------------------------------------------------ MoE layer
@pytest.mark.parametrize("impl", IMPLS)
def test_one_expert_top1_no_shared_equals_dense_ffn(make_config, impl):
    cfg = make_config(n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=0, experts_impl=impl)
    moe = MoE(cfg)
    f = cfg.moe_intermediate_size
    ffn = FeedForward(cfg.hidden_size, f)
    with torch.no_grad():
        ffn.gate_proj.weight.copy_(moe.experts.gate_up_proj[0, :f])
        ffn.up_proj.weight.copy_(moe.experts.gate_up_proj[0, f:])
        ffn.down_proj.weight.copy_(moe.experts.down_proj[0])
    x1 = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_moe, routing = moe(x1)
    y_ffn = ffn(x2)
    torch.testing.assert_close(y_moe, y_ffn, rtol=0, atol=1e-6)
    assert torch.all(routing.topk_weight_TK == 1.0)
    grad = torch.randn_like(y_ffn)
    y_moe.backward(grad)
    y_ffn.backward(grad)
    tol = dict(rtol=1e-5, atol=1e-5)  # the fused gate/up matmul sums in another order than two (MKL's strict mode)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(moe.experts.gate_up_proj.grad[0, :f], ffn.gate_proj.weight.grad, **tol)
    torch.testing.assert_close(moe.experts.gate_up_proj.grad[0, f:], ffn.up_proj.weight.grad, **tol)
    torch.testing.assert_close(moe.experts.down_proj.grad[0], ffn.down_proj.weight.grad, **tol)
    assert torch.all(moe.gate.weight.grad == 0)  # a softmax over one expert is constant


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_shared, norm", [(0, False), (1, False), (2, False), (2, True)])
def test_moe_equals_reference_equations(make_config, impl, n_shared, norm):
    cfg = make_config(n_shared_experts=n_shared, norm_topk_prob=norm, num_experts_per_tok=3, experts_impl=impl)
    moe = MoE(cfg)
    x = torch.randn(3, 4, cfg.hidden_size, requires_grad=True)
    y, routing = moe(x)
    y_ref = reference_moe(moe, cfg, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # gradients w.r.t. the input and every parameter agree too
    grad = torch.randn_like(y)
    params = [x, *moe.parameters()]
    got = torch.autograd.grad(y, params, grad)
    want = torch.autograd.grad(y_ref, params, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert routing.topk_idx_TK.shape == (12, 3) and routing.batch_size == 3


def test_gate_weights_are_raw_softmax_probabilities(make_config):
    cfg = make_config(num_experts_per_tok=3)
    moe = MoE(cfg)
    x = torch.randn(2, 6, cfg.hidden_size)
    _, r = moe(x)
    probs = torch.softmax(x.reshape(-1, cfg.hidden_size) @ moe.gate.weight.t(), dim=-1)
    torch.testing.assert_close(r.probs_TE, probs)
    torch.testing.assert_close(r.topk_weight_TK, probs.gather(1, r.topk_idx_TK), rtol=0, atol=0)
    assert torch.all(r.topk_weight_TK.sum(-1) < 1.0)  # no renormalisation
    # the chosen experts are the K most probable ones
    assert torch.equal(r.topk_idx_TK.sort(-1).values, probs.topk(3, dim=-1).indices.sort(-1).values)


def test_norm_topk_prob_renormalises_to_one(make_config):
    cfg = make_config(num_experts_per_tok=3, norm_topk_prob=True)
    moe = MoE(cfg)
    x = torch.randn(2, 6, cfg.hidden_size)
    _, r = moe(x)
    raw = r.probs_TE.gather(1, r.topk_idx_TK)
    torch.testing.assert_close(r.topk_weight_TK, raw / raw.sum(-1, keepdim=True))
    torch.testing.assert_close(r.topk_weight_TK.sum(-1), torch.ones(12))


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_experts_are_always_on(make_config, impl):
    cfg = make_config(n_shared_experts=2, experts_impl=impl)
    moe = MoE(cfg)
    x = torch.randn(2, 5, cfg.hidden_size)
    y, r = moe(x)
    x_TD = x.reshape(-1, cfg.hidden_size)
    routed = moe.experts(x_TD, r.topk_idx_TK, r.topk_weight_TK)
    torch.testing.assert_close((y.reshape(-1, cfg.hidden_size) - routed), moe.shared_experts(x_TD),
                               rtol=1e-5, atol=1e-6)
    # with every routed expert silenced, the output is exactly the shared experts' (weight 1)
    with torch.no_grad():
        moe.experts.down_proj.zero_()
    y0, _ = moe(x)
    torch.testing.assert_close(y0.reshape(-1, cfg.hidden_size), moe.shared_experts(x_TD), rtol=0, atol=0)


def test_router_math_is_fp32_for_bf16_input(make_config):
    cfg = make_config()
    moe = MoE(cfg).to(torch.bfloat16)
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.bfloat16)
    y, r = moe(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert r.probs_TE.dtype == r.logits_TE.dtype == r.topk_weight_TK.dtype == torch.float32
    logits = x.reshape(-1, cfg.hidden_size).float() @ moe.gate.weight.float().t()
    torch.testing.assert_close(r.logits_TE, logits, rtol=1e-6, atol=1e-6)
    # a bf16 softmax would differ: the probabilities carry more than bf16's 8 bits
    assert not torch.equal(r.probs_TE, r.probs_TE.bfloat16().float())


def test_standalone_moe_is_initialised(make_config):
    cfg = make_config(initializer_range=0.006)
    moe = MoE(cfg)
    for name, p in moe.named_parameters():
        assert torch.isfinite(p).all(), name
        assert p.std().item() == pytest.approx(0.006, rel=0.2), name


def test_init_weights_draws_from_the_generator_and_sets_norms(make_config):
    cfg = make_config(router="hash", n_routed_experts=8, num_experts_per_tok=1, tie_word_embeddings=True)
    a, b = Transformer(cfg), Transformer(cfg)
    init_weights(a, 0.5, torch.Generator().manual_seed(4))
    init_weights(b, 0.5, torch.Generator().manual_seed(4))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.std().item() == pytest.approx(0.5, rel=0.2), name
    assert a.lm_head.weight is a.embed_tokens.weight


def test_reset_tables_builds_a_meta_models_tables_as_an_eager_model_has_them(make_config):
    cfg = make_config(router="hash", n_routed_experts=8, num_experts_per_tok=1)
    with torch.device("meta"):
        model = Transformer(cfg)
    reset_tables(model, "cpu")
    eager = Transformer(cfg)
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(eager.named_buffers()).keys() and len(buffers) == 2 + cfg.num_hidden_layers
    for name, table in eager.named_buffers():
        assert torch.equal(buffers[name], table), name
    assert all(p.is_meta for p in model.parameters())


# ----------------------------------------------------------------------------------------------- Transformer
def test_transformer_shapes_and_moe_layer_pattern(make_config):
    cfg = make_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    model = Transformer(cfg)
    assert [b.is_moe_layer for b in model.layers] == [False, False, True, False, True, False]
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    out = model(ids)
    assert out.logits.shape == (2, 7, cfg.vocab_size) and out.logits.dtype == torch.float32
    assert len(out.router_outputs) == 2 == cfg.num_moe_layers
    for r in out.router_outputs:
        assert r.topk_idx_TK.shape == (14, 2) and r.probs_TE.shape == (14, 8)
        assert int(r.expert_counts_E.sum()) == 14 * 2


def test_dense_model_has_no_router_outputs(make_config):
    cfg = make_config(router="none", n_routed_experts=None)
    model = Transformer(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (1, 5)))
    assert out.router_outputs == [] and not any(b.is_moe_layer for b in model.layers)


def test_tied_embeddings_share_one_tensor(make_config):
    model = Transformer(make_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    model(torch.randint(0, 97, (1, 4))).logits.sum().backward()
    assert model.embed_tokens.weight.grad is model.lm_head.weight.grad


def _repeat_kv_state(state: dict, n_rep: int, num_kv_heads: int) -> dict:
    out = {}
    for key, w in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            w = w.view(num_kv_heads, -1, w.shape[-1]).repeat_interleave(n_rep, dim=0).reshape(-1, w.shape[-1])
        out[key] = w
    return out


def test_gqa_equals_mha_with_repeated_kv_weights(make_config):
    gqa_cfg = make_config(num_attention_heads=4, num_key_value_heads=2)
    gqa = Transformer(gqa_cfg)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)
    mha = Transformer(gqa_cfg.replace(num_key_value_heads=None))
    mha.load_state_dict(_repeat_kv_state(gqa.state_dict(), 2, 2))
    ids = torch.randint(0, gqa_cfg.vocab_size, (2, 9))
    torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=1e-5, atol=1e-5)


def test_attention_is_causal(make_config):
    cfg = make_config()
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a.logits[:, :7], b.logits[:, :7], rtol=1e-5, atol=1e-5)
    assert (a.logits[:, 7:] - b.logits[:, 7:]).abs().amax() > 1e-3
    first = a.router_outputs[0].topk_idx_TK.view(2, 10, -1)
    assert torch.equal(first[:, :7], b.router_outputs[0].topk_idx_TK.view(2, 10, -1)[:, :7])


def test_hash_transformer_routes_by_token_id(make_config):
    cfg = make_config(router="hash", n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    out = model(ids)
    assert len(out.router_outputs) == cfg.num_hidden_layers
    for block, r in zip(model.layers, out.router_outputs):
        assert torch.equal(r.topk_idx_TK[:, 0], block.mlp.gate.table[ids.reshape(-1)])
        assert r.probs_TE is None


def test_sequence_beyond_max_positions_is_rejected(make_config):
    model = Transformer(make_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
