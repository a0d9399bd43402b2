"""Parity of one MoE block against an independent implementation: transformers' DeepseekV2Moe, built from a config
with nothing downloaded (greedy top-k, routed_scaling_factor 1, no group limiting, no top-k renormalisation).

DeepseekV2Moe computes softmax(x W^T) over the routed experts, takes the top-k probabilities as gates, runs the
experts through its own `eager` per-expert loop (one-hot masks, not our sort-based dispatch) and adds one shared MLP
of width n_shared * moe_intermediate_size: the routed + shared math of the paper's Eqs. 9-11.
"""

from __future__ import annotations

import pytest
import torch

from deepseekmoe import MoE

deepseek_v2 = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2")
from transformers import DeepseekV2Config  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402


def _hf_moe(cfg, n_group: int = 1) -> torch.nn.Module:
    hf_cfg = DeepseekV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        moe_intermediate_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        n_group=n_group, topk_group=n_group, hidden_act="silu", mlp_bias=False,
    )
    hf_cfg._experts_implementation = "eager"  # the readable per-expert loop, independent of ours
    sentinel = object()  # "eager" means: no registered kernel, the class's own loop runs
    assert ALL_EXPERTS_FUNCTIONS.get_interface("eager", sentinel) is sentinel
    return deepseek_v2.DeepseekV2Moe(hf_cfg).float()


def _copy_weights(ours: MoE, hf: torch.nn.Module) -> None:
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        hf.experts.down_proj.copy_(ours.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(hf.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("n_shared, top_k", [(1, 3), (2, 6)])
def test_moe_block_matches_transformers_deepseek_v2(make_config, impl, n_shared, top_k):
    cfg = make_config(hidden_size=64, moe_intermediate_size=24, n_routed_experts=16, n_shared_experts=n_shared,
                      num_experts_per_tok=top_k, experts_impl=impl, initializer_range=0.1)
    ours = MoE(cfg)
    hf = _hf_moe(cfg)
    assert hf.experts.gate_up_proj.shape == ours.experts.gate_up_proj.shape == (16, 48, 64)
    assert hf.shared_experts.gate_proj.weight.shape == (24 * n_shared, 64)
    _copy_weights(ours, hf)
    x1 = torch.randn(3, 7, cfg.hidden_size, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_ours, routing = ours(x1)
    y_hf = hf(x2)
    torch.testing.assert_close(y_ours, y_hf, rtol=1e-5, atol=1e-5)
    # the same experts were chosen, with the same gate weights
    _, hf_weights, hf_idx = hf.gate(x2.detach())
    order = hf_idx.argsort(dim=-1)  # HF takes top-k unsorted
    hf_sorted_idx = hf_idx.gather(1, order)
    ours_order = routing.topk_idx_TK.argsort(dim=-1)
    assert torch.equal(routing.topk_idx_TK.gather(1, ours_order), hf_sorted_idx)
    torch.testing.assert_close(routing.topk_weight_TK.gather(1, ours_order), hf_weights.gather(1, order))
    # input gradients and weight gradients
    grad = torch.randn_like(y_hf)
    y_ours.backward(grad)
    y_hf.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.gate.weight.grad, hf.gate.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.experts.gate_up_proj.grad, hf.experts.gate_up_proj.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.experts.down_proj.grad, hf.experts.down_proj.grad, rtol=1e-5, atol=1e-5)


def test_the_parity_check_can_fail(make_config):
    """Renormalised gates (norm_topk_prob) are not DeepseekV2Moe's math: the comparison must see it."""
    cfg = make_config(hidden_size=64, moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=3,
                      norm_topk_prob=True, initializer_range=0.1)
    ours = MoE(cfg)
    hf = _hf_moe(cfg)
    _copy_weights(ours, hf)
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        assert (ours(x)[0] - hf(x)).abs().max() > 1e-3
