"""The decode paths (model/layers.py) against the plain modules: the same greedy tokens and logits within fp32
rounding at tiny-deepseekmoe, tiny-dense, int8, left-padded and per-row batches, with and without the CPU runtime;
the parts that keep their bits keep them exactly (rotation, the few-rows experts, bf16); a call with gradients
(training) never takes them; the fused weights follow their parameters.

Tolerance: the fused q/k/v projection is one matmul over the concatenated weights, whose kernel may block and sum
the products of an output in another order than three separate matmuls, so a value may differ by a few units in
the last place of fp32 (about 1e-7 relative); over a 4-layer model the logits (|logit| < 1) stay within 1e-5, far
below the gaps that decide a greedy token here.
"""

from __future__ import annotations

import pytest
import torch

from deepseekmoe import Transformer, load_preset
from deepseekmoe.model import experts
from deepseekmoe.model.experts import experts_grouped, experts_loop
from deepseekmoe.model.layers import RotaryEmbedding, apply_rotary, apply_rotary_tables
from deepseekmoe.runtime.cpu import CpuRuntime
from conftest import tiny_config
from test_quantize import _quantized_copy

ATOL, RTOL = 1e-5, 1e-5


def _greedy(model: Transformer, prompt_BS: torch.Tensor, steps: int, on: bool,
            mask_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, steps), logits (steps, B, V)) of greedy cached decoding with the decode paths on or off."""
    model.use_decode_paths(on)
    b, s = prompt_BS.shape
    with torch.inference_mode():
        caches = model.new_kv_caches(b, s + steps)
        logits = model(prompt_BS, 0, caches, attention_mask=mask_BS).logits[:, -1]
        tokens, all_logits = [], []
        for pos in range(s, s + steps):
            tok = logits.argmax(-1, keepdim=True)
            tokens.append(tok)
            all_logits.append(logits)
            if mask_BS is not None:
                mask_BS = torch.cat([mask_BS, torch.ones(b, 1, dtype=torch.bool)], 1)
            logits = model(tok, pos, caches, attention_mask=mask_BS).logits[:, -1]
    model.use_decode_paths(True)
    return torch.cat(tokens, 1), torch.stack(all_logits)


def _assert_same_decode(model: Transformer, prompt_BS: torch.Tensor, steps: int = 12, **kw) -> None:
    tokens_on, logits_on = _greedy(model, prompt_BS, steps, True, **kw)
    tokens_off, logits_off = _greedy(model, prompt_BS, steps, False, **kw)
    assert torch.equal(tokens_on, tokens_off)
    torch.testing.assert_close(logits_on, logits_off, atol=ATOL, rtol=RTOL)
    assert not torch.equal(logits_on, torch.zeros_like(logits_on))


def _model(preset: str | None = None) -> Transformer:
    """A preset, or (None) the tests' tiny debug model with 8 routed experts of which 2 a token and one shared,
    its first layer dense."""
    torch.manual_seed(0)
    return Transformer(load_preset(preset) if preset else tiny_config(first_k_dense_replace=1)).eval()


def _prompt(vocab: int, b: int, s: int) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset", ["tiny-deepseekmoe", "tiny-dense"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("runtime", [False, True])
def test_decode_paths_give_the_plain_tokens_and_logits(preset: str, batch: int, runtime: bool):
    model = _model(preset)
    rt = CpuRuntime.apply(model, workers=2) if runtime else None
    try:
        _assert_same_decode(model, _prompt(model.config.vocab_size, batch, 8), steps=6)
    finally:
        if rt is not None:
            rt.close()


def test_decode_paths_are_taken_and_run_fewer_ops():
    model = _model("tiny-deepseekmoe")
    prompt = _prompt(model.config.vocab_size, 1, 8)

    def ops_per_step(on: bool) -> int:
        model.use_decode_paths(on)
        with torch.inference_mode():
            caches = model.new_kv_caches(1, 10)
            model(prompt, 0, caches)
            model(prompt[:, :1], 8, caches)  # builds the fused weights
            with torch.profiler.profile() as prof:
                model(prompt[:, :1], 9, caches)
        return sum(e.name.startswith("aten::") for e in prof.events())
    on, off = ops_per_step(True), ops_per_step(False)
    assert model.layers[0].self_attn._qkv._weight is not None
    assert on < 0.7 * off


def test_left_padded_batch_decodes_alike():
    model = _model()
    prompt = _prompt(model.config.vocab_size, 3, 9)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :4] = mask[2, :7] = False  # rows of 9, 5 and 2 real tokens, padded on the left
    _assert_same_decode(model, prompt, mask_BS=mask)


def test_per_row_positions_decode_alike():
    """The serving engine's form: every row at its own position (a (B,) start_pos), its own cache row."""
    model = _model()
    lengths = torch.tensor([5, 9, 2])
    results = []
    for on in (True, False):
        model.use_decode_paths(on)
        with torch.inference_mode():
            caches = model.new_kv_caches(3, 20)
            for row, n in enumerate(lengths.tolist()):  # each row's prompt into its own cache row
                row_caches = [_row_view(c, row) for c in caches]
                model(_prompt(model.config.vocab_size, 1, n), 0, row_caches)
            tok, pos, out = torch.full((3, 1), 5), lengths.clone(), []
            for _ in range(6):
                logits = model(tok, pos, caches).logits[:, -1]
                out.append(logits)
                tok, pos = logits.argmax(-1, keepdim=True), pos + 1
        results.append(torch.stack(out))
    assert torch.equal(results[0].argmax(-1), results[1].argmax(-1))
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=RTOL)


def _row_view(cache, row: int):
    view = type(cache).__new__(type(cache))
    torch.nn.Module.__init__(view)
    view.register_buffer("k", cache.k[row:row + 1], persistent=False)
    view.register_buffer("v", cache.v[row:row + 1], persistent=False)
    return view


def test_int8_model_decodes_alike():
    model = _quantized_copy(_model(), "int8")
    _assert_same_decode(model, _prompt(model.config.vocab_size, 2, 8), steps=6)


def test_training_calls_never_take_the_decode_paths():
    """A forward with gradients on a handful of rows: the same loss and gradients, bit for bit, either way."""
    model = _model().train()
    ids = _prompt(model.config.vocab_size, 2, 4)  # 8 rows: few enough for the decode paths without gradients
    results = []
    for on in (True, False):
        model.use_decode_paths(on)
        model.zero_grad(set_to_none=True)
        loss = model(ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert model.layers[0].self_attn._qkv._weight is None


def test_fused_weights_follow_their_parameters():
    model = _model()
    prompt = _prompt(model.config.vocab_size, 1, 6)
    _greedy(model, prompt, 2, True)
    with torch.no_grad():  # an optimizer step, in place
        for p in model.parameters():
            p.mul_(1.5)
    _assert_same_decode(model, prompt, steps=4)
    for p in model.parameters():  # other memory, version 0 again
        p.data = p.data.clone().neg_()
    _assert_same_decode(model, prompt, steps=4)
    model.load_state_dict(_model().state_dict())
    _assert_same_decode(model, prompt, steps=4)
    tokens_new, _ = _greedy(model, prompt, 4, True)
    tokens_fresh, _ = _greedy(_model(), prompt, 4, False)
    assert torch.equal(tokens_new, tokens_fresh)


def test_rotary_tables_rotate_with_the_same_bits():
    rotary = RotaryEmbedding(32, 64, 10000.0)
    x = torch.randn(3, 6, 5, 32)  # (B, heads, S, hd)
    cos, sin = rotary(torch.arange(7, 12))
    assert torch.equal(apply_rotary_tables(x, cos, sin), apply_rotary(x, cos, sin))
    cos, sin = rotary(torch.tensor([[1], [30], [63]]))
    cos, sin = cos[:, None], sin[:, None]  # per-row tables (B, 1, S, hd)
    for x in (torch.randn(3, 6, 1, 32), torch.randn(3, 6, 1, 32).bfloat16()):
        assert torch.equal(apply_rotary_tables(x, cos, sin), apply_rotary(x, cos, sin))


@pytest.mark.parametrize("tokens", [1, 8, 18])
def test_few_rows_experts_match_the_loop(tokens: int, monkeypatch):
    monkeypatch.setattr(experts, "ONE_TOKEN_MAX_BYTES", 0)  # one token too: the few-rows form
    torch.manual_seed(0)
    e, d, f, k = 12, 32, 20, 3
    gate_up, down = torch.randn(e, 2 * f, d) * 0.2, torch.randn(e, d, f) * 0.2
    x = torch.randn(tokens, d)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
    weight = torch.rand(tokens, k)
    with torch.inference_mode():
        expected = experts_loop(x, idx, weight, gate_up, down)
        inline = experts_grouped(x, idx, weight, gate_up, down, "per_expert")
        plain = experts_grouped(x, idx, weight, gate_up, down, "per_expert", few_rows=False)
        with CpuRuntime(2, min_expert_work=0, min_weight_bytes=0) as runtime:  # chunks on two workers
            workers = experts_grouped(x, idx, weight, gate_up, down, "per_expert", runtime)
    torch.testing.assert_close(inline, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(inline, plain)  # the same matmuls and sums, fewer ops around them
    assert torch.equal(workers, inline)


def test_one_token_experts_match_the_loop(monkeypatch):
    torch.manual_seed(0)
    e, d, f, k = 12, 32, 20, 3
    gate_up, down = torch.randn(e, 2 * f, d) * 0.2, torch.randn(e, d, f) * 0.2
    x, idx, weight = torch.randn(1, d), torch.randperm(e)[:k][None], torch.rand(1, k)
    taken = []
    one_token = experts._one_token_forward
    monkeypatch.setattr(experts, "_one_token_forward", lambda *a: taken.append(1) or one_token(*a))
    with torch.inference_mode():
        got = experts_grouped(x, idx, weight, gate_up, down, "per_expert")
        plain = experts_grouped(x, idx, weight, gate_up, down, "per_expert", few_rows=False)
        expected = experts_loop(x, idx, weight, gate_up, down)
    assert taken == [1]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=1e-5)
    with torch.inference_mode():  # two tokens, or weights above the limit: the sorted dispatch
        experts_grouped(x.expand(2, -1), idx.expand(2, -1), weight.expand(2, -1), gate_up, down, "per_expert")
        monkeypatch.setattr(experts, "ONE_TOKEN_MAX_BYTES", k * (gate_up[0].nbytes + down[0].nbytes) - 1)
        experts_grouped(x, idx, weight, gate_up, down, "per_expert")
    xg = x.clone().requires_grad_()  # and anything with gradients
    experts_grouped(xg, idx, weight, gate_up, down, "per_expert")
    assert taken == [1]


def test_bf16_model_keeps_its_bits():
    """In bf16 only the rotation (the same bits) is taken: the fused projection and the few-rows experts are fp32
    paths (the CPU runtime's weight-major matmuls are faster in bf16)."""
    model = _model().to(torch.bfloat16)
    tokens_on, logits_on = _greedy(model, _prompt(model.config.vocab_size, 2, 8), 4, True)
    tokens_off, logits_off = _greedy(model, _prompt(model.config.vocab_size, 2, 8), 4, False)
    assert torch.equal(tokens_on, tokens_off) and torch.equal(logits_on, logits_off)
