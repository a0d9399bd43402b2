"""transformers features on the DeepSeekMoE classes, each checked against real values from our own model.

Hidden states are our blocks' inputs and final norm (read with forward hooks), attention weights are recomputed
from our attention's projections and rotary tables, `inputs_embeds` gives the input_ids logits, gradient
checkpointing recomputes the layers and gives the same gradients, the base model and the classification head are
the causal LM's trunk.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import deepseekmoe.hf  # noqa: F401  (registers model_type "deepseek")
from deepseekmoe import Transformer
from deepseekmoe.hf import DeepseekForSequenceClassification, DeepseekModel
from deepseekmoe.model.layers import apply_rotary
from hf_helpers import VOCAB, export_tiny

ATOL = RTOL = 1e-5  # float32, the same math in a different order


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Transformer, Path]:
    return export_tiny(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_model(exported):
    return AutoModelForCausalLM.from_pretrained(exported[1]).eval()


def _our_hidden_states(native: Transformer, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple]]:
    """(every block's input, then the final norm's output; each attention's (input, cos, sin))."""
    states, attn_inputs = [], []
    hooks = [native.embed_tokens.register_forward_hook(lambda m, a, out: states.append(out))]
    hooks += [block.register_forward_hook(lambda m, a, out: states.append(out[0])) for block in native.layers]
    hooks += [block.self_attn.register_forward_pre_hook(lambda m, a: attn_inputs.append(a[:3]))
              for block in native.layers]
    hooks.append(native.norm.register_forward_hook(lambda m, a, out: states.append(out)))
    try:
        native(ids)
    finally:
        for h in hooks:
            h.remove()
    return states[:-2] + states[-1:], attn_inputs  # the last block's output is only seen through the norm


def _our_attention_weights(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    b, s, _ = x.shape
    q = apply_rotary(attn.q_proj(x).view(b, s, attn.num_heads, -1).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(b, s, attn.num_kv_heads, -1).transpose(1, 2), cos, sin)
    k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    scores = q @ k.transpose(2, 3) / attn.head_dim ** 0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def test_hidden_states_and_attentions_are_ours(hf_model, exported):
    native = exported[0]
    ids = torch.randint(0, VOCAB, (2, 10))
    out = hf_model(ids, output_hidden_states=True, output_attentions=True)
    ours, attn_inputs = _our_hidden_states(native, ids)
    assert len(out.hidden_states) == native.config.num_hidden_layers + 1 == len(ours)
    for i, (theirs, mine) in enumerate(zip(out.hidden_states, ours)):
        torch.testing.assert_close(theirs, mine, rtol=RTOL, atol=ATOL, msg=f"hidden state {i}")
    assert len(out.attentions) == native.config.num_hidden_layers
    for i, (weights, (x, cos, sin)) in enumerate(zip(out.attentions, attn_inputs)):
        assert weights.shape == (2, 4, 10, 10)
        torch.testing.assert_close(weights, _our_attention_weights(native.layers[i].self_attn, x, cos, sin),
                                   rtol=RTOL, atol=ATOL, msg=f"attention {i}")
    torch.testing.assert_close(out.logits, native(ids).logits, rtol=RTOL, atol=ATOL)  # eager path, same logits
    plain = hf_model(ids)
    assert plain.hidden_states is None and plain.attentions is None


@torch.no_grad()
def test_inputs_embeds_give_the_input_ids_results(hf_model):
    ids = torch.randint(3, VOCAB, (2, 8))
    embeds = hf_model.get_input_embeddings()(ids)
    torch.testing.assert_close(hf_model(inputs_embeds=embeds).logits, hf_model(ids).logits, rtol=0, atol=0)
    by_ids = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    by_embeds = hf_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                  do_sample=False)
    assert torch.equal(by_embeds, by_ids[:, 8:])  # generate from embeddings returns only the new tokens


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(exported):
    model = AutoModelForCausalLM.from_pretrained(exported[1]).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    calls = []
    model.model.layers[1].self_attn.register_forward_hook(lambda m, a, out: calls.append(1))

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        calls.clear()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    loss, expected = grads()
    assert len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the method's new name is activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    again, got = grads()
    assert len(calls) == 2  # the layer ran again in the backward pass
    assert torch.equal(again, loss)
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=0, atol=0, msg=key)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert model(ids, labels=ids).loss < loss  # it trains


@torch.no_grad()
def test_base_model_and_classification_head_use_the_same_trunk(hf_model, exported):
    base = AutoModel.from_pretrained(exported[1]).eval()
    assert type(base) is DeepseekModel
    ids = torch.randint(3, VOCAB, (2, 9))
    hidden = base(ids).last_hidden_state
    torch.testing.assert_close(hf_model.lm_head(hidden), hf_model(ids).logits, rtol=0, atol=0)
    head = AutoModelForSequenceClassification.from_pretrained(exported[1], num_labels=3).eval()
    assert type(head) is DeepseekForSequenceClassification and head.config.pad_token_id == 2
    padded = ids.clone()
    padded[1, 6:] = 2  # right padding: the second sequence ends at position 5
    labels = torch.tensor([0, 2])
    out = head(padded, labels=labels)
    trunk = base(padded).last_hidden_state
    pooled = head.score(torch.stack([trunk[0, -1], trunk[1, 5]]))
    torch.testing.assert_close(out.logits, pooled, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(pooled, labels))
