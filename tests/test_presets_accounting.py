"""Presets and accounting: counts agree with real modules, the paper's figures, and its Table 1/2 matching."""

from __future__ import annotations

import math

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer, load_preset, preset_names
from deepseekmoe.accounting import count, estimate_mfu
from deepseekmoe.errors import UserError
from deepseekmoe.model.layers import RMSNorm

TINY = [n for n in preset_names() if n.startswith("tiny-")]


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def _activated_from_module(model: Transformer) -> tuple[int, int]:
    """(activated params, matmul params) counted from the module's own tensors, independently of accounting.py:
    all parameters minus, in each MoE layer, the (E - K) routed experts a token does not use."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    for block in model.layers:
        if block.is_moe_layer:
            experts = block.mlp.experts
            per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // cfg.n_routed_experts
            unused += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    active = total - unused
    norms = sum(m.weight.numel() for m in model.modules() if isinstance(m, RMSNorm))
    # the embedding lookup is no matmul; the LM head always is (tied or not)
    matmul = active - norms - model.embed_tokens.weight.numel() + (model.lm_head.weight.numel()
                                                                   if cfg.tie_word_embeddings else 0)
    return active, matmul


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_on_meta_and_total_params_match(name):
    cfg = load_preset(name)
    model = _meta_model(cfg)
    assert count(cfg).total_params == model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert count(cfg).moe_layers == sum(b.is_moe_layer for b in model.layers) == cfg.num_moe_layers


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_active_and_matmul_params_match_the_module(name):
    cfg = load_preset(name)
    model = _meta_model(cfg)  # same module tree as a real one, no allocation
    active, matmul = _activated_from_module(model)
    acc = count(cfg, seq_len=256)
    assert acc.total_params == sum(p.numel() for p in model.parameters())
    assert acc.active_params == active
    assert acc.matmul_params == matmul
    layers, width = cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim
    assert acc.flops_per_token == 6 * matmul + 12 * layers * width * 256
    assert acc.flops_per_sequence == acc.flops_per_token * 256 and acc.seq_len == 256


def test_tiny_deepseekmoe_active_params_by_hand():
    # d=128, V=8192, 4 layers, 4 heads; 1 shared + 7 of 63 routed experts of width 344/4 = 86; untied head
    d, v, layers, e, k, ks, f = 128, 8192, 4, 63, 7, 1, 86
    per_layer = 4 * d * d + e * d + 3 * d * f * (k + ks) + 2 * d
    expected = 2 * v * d + d + layers * per_layer
    cfg = load_preset("tiny-deepseekmoe")
    assert count(cfg).active_params == expected == 3_449_472
    real = Transformer(cfg)  # a real, allocated module
    assert _activated_from_module(real)[0] == expected
    total = 2 * v * d + d + layers * (4 * d * d + e * d + 3 * d * f * (e + ks) + 2 * d)
    assert count(cfg).total_params == sum(p.numel() for p in real.parameters()) == total == 10_846_848


def test_tied_embeddings_counted_once(make_config):
    cfg = make_config(tie_word_embeddings=True)
    model = Transformer(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert count(cfg).total_params == model.num_parameters()
    untied = count(cfg.replace(tie_word_embeddings=False))
    assert untied.total_params - count(cfg).total_params == cfg.vocab_size * cfg.hidden_size
    assert untied.flops_per_token == count(cfg).flops_per_token  # the head still multiplies


@pytest.mark.parametrize("name, total, active", [
    ("deepseekmoe-16b", 16.4e9, 2.8e9),
    ("deepseekmoe-145b", 144.6e9, 22.2e9),
    ("deepseekmoe-2b", 2.0e9, 0.3e9),
    ("dense-0.2b", 0.2e9, 0.2e9),
    ("2b-gshard", 2.0e9, 0.3e9),
    ("2b-switch", 2.0e9, 0.2e9),
    ("2b-hash", 2.0e9, 0.2e9),
])
def test_paper_parameter_figures(name, total, active):
    acc = count(load_preset(name))
    assert abs(acc.total_params - total) <= 0.05e9, acc.total_params
    assert abs(acc.active_params - active) <= 0.05e9, acc.active_params


@pytest.mark.parametrize("name, seq_len, paper_tflops, rel", [
    ("deepseekmoe-2b", 2048, 4.3, 0.03),
    ("2b-gshard", 2048, 4.3, 0.03),
    ("dense-0.2b", 2048, 2.9, 0.03),
    ("2b-hash", 2048, 2.9, 0.03),
    ("2b-switch", 2048, 2.9, 0.03),
    ("2b-gshard-x1.5", 2048, 5.8, 0.03),
    ("2b-dense-x16", 2048, 24.6, 0.03),
    ("deepseekmoe-16b", 4096, 74.4, 0.03),
    ("deepseekmoe-145b", 4096, 585.6, 0.01),
    ("deepseek-7b", 4096, 183.5, 0.01),
    ("llama2-7b", 4096, 187.9, 0.01),
])
def test_paper_flops_figures(name, seq_len, paper_tflops, rel):
    ours = count(load_preset(name), seq_len).flops_per_sequence / 1e12
    assert ours == pytest.approx(paper_tflops, rel=rel)


def test_paper_table2_expert_params():
    """Table 2: DeepSeekMoE 2B and Dense x16 have 1.89B total expert params; DeepSeekMoE activates 0.24B."""
    cfg = load_preset("deepseekmoe-2b")
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    width = cfg.moe_intermediate_size
    total_expert = layers * 3 * d * width * (cfg.n_routed_experts + cfg.n_shared_experts)
    active_expert = layers * 3 * d * width * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    assert total_expert == pytest.approx(1.89e9, abs=0.005e9)
    assert active_expert == pytest.approx(0.24e9, abs=0.005e9)
    dense16 = load_preset("2b-dense-x16")
    assert layers * 3 * d * dense16.intermediate_size == pytest.approx(1.89e9, abs=0.005e9)


def test_expert_combinations_of_the_papers_toy_example():
    fine = ModelConfig.from_paper(num_experts=16, granularity=4, top_k=2, num_shared=0, ffn_size=344)
    assert (fine.n_routed_experts, fine.num_experts_per_tok) == (64, 8)
    assert count(fine).expert_combinations == 4_426_165_368
    coarse = ModelConfig.from_paper(num_experts=16, granularity=1, top_k=2, num_shared=0, ffn_size=344)
    assert count(coarse).expert_combinations == 120
    assert count(load_preset("deepseekmoe-16b")).expert_combinations == math.comb(64, 6)
    assert count(load_preset("dense-0.2b")).expert_combinations == 1


# families matched the way the paper's Table 1 / Figure 3 match them
_SAME_TOTAL = ["hash", "switch", "gshard", "deepseekmoe", "ablation-shared", "ablation-m2", "shared2", "shared4",
               "deepseekmoe-half", "dense-x16"]
_ONE_FFN_ACTIVE = ["dense", "hash", "switch"]
_TWO_FFN_ACTIVE = ["gshard", "deepseekmoe", "ablation-shared", "ablation-m2", "shared2", "shared4"]


def _family_name(prefix: str, suffix: str) -> str:
    if prefix == "2b":
        return {"deepseekmoe": "deepseekmoe-2b", "dense": "dense-0.2b"}.get(suffix, f"2b-{suffix}")
    return f"{prefix}-{suffix}"


@pytest.mark.parametrize("prefix", ["tiny", "small", "2b"])
def test_families_match_total_and_activated_params(prefix):
    acc = {s: count(load_preset(_family_name(prefix, s))) for s in set(_SAME_TOTAL + _ONE_FFN_ACTIVE)}
    ref_total = acc["deepseekmoe"].total_params
    for s in _SAME_TOTAL:
        assert acc[s].total_params == pytest.approx(ref_total, rel=0.01), s
    # Dense and Hash activate exactly one standard FFN; Switch adds only its router
    assert acc["dense"].active_params == acc["hash"].active_params
    assert acc["switch"].active_params == pytest.approx(acc["dense"].active_params, rel=0.01)
    ref_active = acc["deepseekmoe"].active_params
    for s in _TWO_FFN_ACTIVE:
        assert acc[s].active_params == pytest.approx(ref_active, rel=0.01), s
    # GShard activates exactly one more standard FFN per layer than Switch (same router)
    cfg = load_preset(_family_name(prefix, "gshard"))
    one_ffn = cfg.num_hidden_layers * 3 * cfg.hidden_size * cfg.intermediate_size
    assert acc["gshard"].active_params - acc["switch"].active_params == one_ffn


def test_gshard_x15_is_bigger_as_in_table2():
    two_b = count(load_preset("deepseekmoe-2b"))
    x15 = count(load_preset("2b-gshard-x1.5"))
    assert x15.total_params == pytest.approx(2.9e9, abs=0.05e9)  # "GShard 2.9B" in the abstract
    assert x15.total_params / two_b.total_params == pytest.approx(1.48, abs=0.02)


def test_unknown_preset_lists_names():
    with pytest.raises(UserError) as info:
        load_preset("deepseekmoe-17b")
    message = info.value.args[0]
    assert message.startswith("unknown preset 'deepseekmoe-17b'; available: ")
    assert all(n in message for n in preset_names())


def test_estimate_mfu():
    cfg = load_preset("deepseekmoe-16b")
    per_token = count(cfg, 4096).flops_per_token
    assert estimate_mfu(cfg, 4096, tokens_per_second=1000.0, peak_flops=per_token * 4000.0) == pytest.approx(0.25)


def test_every_preset_keeps_its_recorded_config_and_counts():
    """tests/data/presets.json: every preset's fields that differ from ModelConfig's defaults, and its parameter
    and FLOPs counts (seq 2048), as they were when the families were written out field by field; building them
    through ModelConfig.from_paper changed none of them."""
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "data" / "presets.json").read_text())
    assert sorted(recorded) == preset_names()
    defaults = ModelConfig().to_dict()
    for name, expected in recorded.items():
        cfg = load_preset(name)
        d = cfg.to_dict()
        changed = {k: v for k, v in d.items() if defaults[k] != v or type(defaults[k]) is not type(v)}
        assert changed == expected["changed"], name
        assert all(type(d[k]) is type(v) for k, v in expected["changed"].items()), name
        acc = count(cfg, 2048)
        assert (acc.total_params, acc.active_params, acc.flops_per_token) == (
            expected["total_params"], expected["active_params"], expected["flops_per_token_2048"]), name


def test_the_families_are_the_papers_notation():
    assert load_preset("tiny-deepseekmoe") == ModelConfig.from_paper(
        num_experts=16, granularity=4, top_k=2, num_shared=1, ffn_size=344, vocab_size=8192, hidden_size=128,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512, intermediate_size=344)
    assert load_preset("2b-gshard-x1.5").moe_intermediate_size == round(3416 * 1.5)
