"""Weight-only int8 / int4: the quantize/dequantize math on hand-computed values, each kernel against
dequantize-then-matmul, the quantized experts through every dispatch, the checkpoint layout, the commands, and the
quality bounds on the tiny and small presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepseekmoe import ModelConfig, Transformer, cli
from deepseekmoe.convert.quantize import MemorySink, QuantizingWriter, convert_quantized, quantized_entries
from deepseekmoe.inference import loading
from deepseekmoe.inference.loading import build_quantized_model, load_for_inference, load_weights
from deepseekmoe.model.experts import RoutedExperts
from deepseekmoe.model.int4_layout import kernel_layout
from deepseekmoe.model.quantized import (QuantizedLinear, QuantizedWeight, dequantize, quantize, quantize_int4,
                                         quantize_int8, quantized_linear, unpack_int4)
from deepseekmoe.presets import load_preset
from deepseekmoe.runtime.cpu import CpuRuntime
from deepseekmoe.checkpoint import save_model
from test_convert import HF_CONFIG, write_official
from test_generate import train_tokenizer


# ------------------------------------------------------------------------------------------------ the math
def test_int8_hand_computed():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 63.5, -254.0]])
    q, s = quantize_int8(w)
    assert torch.equal(s, torch.tensor([2 / 127, 1.0, 2.0]))
    # 1 / (2/127) = 63.5 and 127 / 2 = 63.5 round to the even 64; 0.5 * 63.5 = 31.75 -> 32
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [64, 32, -127]] and q.dtype == torch.int8
    assert torch.allclose(dequantize(q, s, "int8"), torch.tensor([[64 * 2 / 127, -2.0, 64 / 127], [0, 0, 0],
                                                                  [128.0, 64.0, -254.0]]))


def test_int4_hand_computed():
    group_a = torch.arange(-7.0, 7.0).repeat(3)[:32]  # max |w| 7: scale 1, q = w
    group_b = 2 * torch.arange(-8.0, 8.0).repeat(2)  # max |w| 16: scale 16/7, q = round(w * 7/16)
    nibbles, s = quantize_int4(torch.cat([group_a, group_b])[None], 32)
    assert torch.equal(s, torch.tensor([[1.0, 16 / 7]])) and nibbles.shape == (1, 32)
    assert nibbles[0, 0].item() == (-7 + 8) | ((-6 + 8) << 4)  # columns 0, 1: low nibble, high nibble
    assert nibbles[0, 16].item() == (-7 + 8) | ((round(-14 * 7 / 16) + 8) << 4)
    assert torch.equal(unpack_int4(nibbles)[0, :32], group_a.to(torch.int8))
    assert unpack_int4(nibbles)[0, 32:36].tolist() == [-7, -6, -5, -4]  # -16, -14, -12, -10 times 7/16


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dequantized_error_is_within_half_a_step(fmt):
    w = torch.randn(3, 48, 128)
    q, s = quantize(w, fmt, 64)
    step = s[..., None] if fmt == "int8" else s.repeat_interleave(64, dim=-1)
    assert ((dequantize(q, s, fmt) - w).abs() <= step / 2 + 1e-6).all()


# ----------------------------------------------------------------------------------------------- kernels
def _weight(fmt: str, o: int, i: int, dtype: torch.dtype, group: int = 64) -> tuple[QuantizedWeight, torch.Tensor]:
    q, s = quantize(torch.randn(o, i), fmt, group)
    return QuantizedWeight.from_stored(q, s, dtype), dequantize(q, s, fmt)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_kernel_matches_dequantize_then_matmul(fmt, dtype, rows):
    w, w_float = _weight(fmt, 208, 256, dtype)  # 208 rows: int4's last 64-row block is partial
    x = torch.randn(rows, 256).to(dtype)
    expected = x.float() @ w_float.t()
    got = quantized_linear(x, w)
    assert got.dtype == dtype and got.shape == (rows, 208)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_row_slices_multiply_like_the_whole(fmt):
    w, _ = _weight(fmt, 208, 128, torch.float32)
    x = torch.randn(2, 128)
    parts = [quantized_linear(x, w.rows(a, min(a + 64, 208))) for a in range(0, 208, 64)]
    assert torch.equal(torch.cat(parts, dim=-1), quantized_linear(x, w))


def test_an_unaligned_int8_weight_is_copied_before_the_kernel_reads_it():
    q, s = quantize(torch.randn(64, 64), "int8")
    buffer = torch.empty(64 * 64 + 1, dtype=torch.int8)
    unaligned = buffer[1:].view(64, 64)
    unaligned.copy_(q)
    assert unaligned.data_ptr() % 64
    w = QuantizedWeight.from_stored(unaligned, s, torch.bfloat16)
    assert w.data.data_ptr() % 64 == 0 and torch.equal(w.data, q)
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert torch.equal(quantized_linear(x, w), quantized_linear(x, QuantizedWeight.from_stored(q, s, torch.bfloat16)))


# ------------------------------------------------------------------------------------------------ experts
def _quantized_experts(config: ModelConfig, fmt: str) -> tuple[RoutedExperts, RoutedExperts]:
    """(float experts holding the dequantized weights, the same experts quantized)."""
    ref, quant = RoutedExperts(config), RoutedExperts(config)
    for attr in ("gate_up_proj", "down_proj"):
        q, s = quantize(torch.randn(getattr(ref, attr).shape), fmt, 32)
        getattr(ref, attr).data = dequantize(q, s, fmt)
        delattr(quant, attr)
        setattr(quant, attr, QuantizedWeight.from_stored(q, s, torch.float32))
    return ref, quant


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_quantized_experts_agree_in_every_dispatch(make_config, fmt, tokens):
    config = make_config(hidden_size=64, moe_intermediate_size=64)
    ref, quant = _quantized_experts(config, fmt)
    x = torch.randn(tokens, 64)
    idx = torch.randint(0, config.n_routed_experts, (tokens, 2))
    weight = torch.rand(tokens, 2)
    with torch.no_grad():
        expected = ref(x, idx, weight)
        inline = quant(x, idx, weight)
        quant.impl = "loop"
        loop = quant(x, idx, weight)
        quant.impl = "grouped"
        with CpuRuntime(2, min_expert_work=0, min_weight_bytes=0) as runtime:
            quant.runner = runtime
            workers = quant(x, idx, weight)
    assert quant.kernel("cpu", torch.float32) == "per_expert"
    assert torch.equal(inline, workers) and torch.allclose(loop, inline, atol=1e-5 * inline.abs().max())
    assert torch.allclose(inline, expected, atol=1e-4 * expected.abs().max())


def test_runtime_splits_quantized_matmuls_between_workers():
    w, _ = _weight("int8", 320, 64, torch.float32)
    layer = QuantizedLinear(w)
    x = torch.randn(1, 3, 64)
    with torch.inference_mode():
        expected = layer(x)
        runtime = CpuRuntime(2, min_weight_bytes=0)
        runtime.attach(torch.nn.Sequential(layer))
        assert layer.matmul == runtime.linear
        got = layer(x)
        runtime.close()
    assert torch.equal(got, expected)


# -------------------------------------------------------------------------------------- checkpoints, commands
def _quantized_copy(model: Transformer, fmt: str, group_size: int = 128) -> Transformer:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    entries = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    sink = MemorySink(quantized_entries(entries, fmt, group_size))
    writer = QuantizingWriter(sink, entries, fmt, group_size)
    for k, v in state.items():
        writer.write(k, v)
    return build_quantized_model(model.config, sink.state)


@pytest.fixture
def float_checkpoint(tmp_path: Path, make_config) -> tuple[Path, Transformer]:
    config = make_config(hidden_size=64, moe_intermediate_size=64, intermediate_size=128, vocab_size=300,
                         first_k_dense_replace=1)
    model = Transformer(config).eval()
    train_tokenizer(tmp_path / "tokenizer.json")
    return save_model(model, tmp_path / "float", tmp_path / "tokenizer.json"), model


def test_quantized_checkpoint_layout(float_checkpoint, tmp_path: Path):
    src, model = float_checkpoint
    out = convert_quantized(src, tmp_path / "q", "int4", 32)
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization"] == {"format": "int4", "group_size": 32, "scale_dtype": "float32",
                                   "int4_layout": kernel_layout()}
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert dtypes["embed_tokens.weight"] == dtypes["layers.1.mlp.gate.weight"] == "F32"
    assert dtypes["layers.0.input_layernorm.weight"] == "F32"
    assert dtypes["layers.0.self_attn.q_proj.weight"] == dtypes["layers.1.mlp.experts.down_proj"] == "U8"
    assert shapes["layers.1.mlp.experts.down_proj"] == [8, 64, 32]
    assert shapes["layers.1.mlp.experts.down_proj_scale"] == [8, 64, 2]
    assert dtypes["lm_head.weight"] == "I8"  # 300 output rows: not a multiple of 16, kept in int8
    raw_file = (out / "model.safetensors").read_bytes()
    header = json.loads(raw_file[8:8 + int.from_bytes(raw_file[:8], "little")])
    itemsize = {"F32": 4, "U8": 1, "I8": 1}
    assert (8 + int.from_bytes(raw_file[:8], "little")) % 64 == 0  # the data starts 64-byte aligned
    assert all(v["data_offsets"][0] % itemsize[v["dtype"]] == 0 for k, v in header.items() if k != "__metadata__")
    assert min(v["data_offsets"][0] for v in header.values() if v.get("dtype") == "U8") > \
        max(v["data_offsets"][0] for v in header.values() if v.get("dtype") == "F32")
    loaded = load_weights(out)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, _quantized_copy(model, "int4", 32)(ids).logits)


def test_int8_weights_are_the_stored_tensors(float_checkpoint, tmp_path: Path):
    out = convert_quantized(float_checkpoint[0], tmp_path / "q", "int8")
    model = load_weights(out)
    weight = model.layers[1].mlp.experts.gate_up_proj.data
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(weight, f.get_tensor("layers.1.mlp.experts.gate_up_proj"))
    assert isinstance(model.lm_head, QuantizedLinear) and not isinstance(model.layers[1].mlp.gate, QuantizedLinear)


def _hf_config() -> dict:
    return {**HF_CONFIG, "hidden_size": 64, "moe_intermediate_size": 32, "intermediate_size": 128,
            "vocab_size": 64}


def test_convert_and_generate_from_an_hf_directory(tmp_path: Path, capsys):
    hf = write_official(tmp_path / "hf", _hf_config())
    assert cli.main(["convert", "--from-hf", str(hf), "--out", str(tmp_path / "q8"), "--quantize", "int8"]) == 0
    args = ["--prompt", "w3 w4", "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path / "q8"), *args]) == 0
    stored = capsys.readouterr().out
    assert cli.main(["generate", str(hf), "--quantize", "int8", *args]) == 0
    assert capsys.readouterr().out == stored and len(stored.split()) > 2
    assert cli.main(["generate", str(tmp_path / "q8"), "--quantize", "int4", *args]) == 2
    assert "stored in int8" in capsys.readouterr().err


def test_quantized_weights_refuse_another_device(float_checkpoint, capsys):
    with pytest.raises(ValueError, match="run on the CPU only"):
        load_weights(float_checkpoint[0], torch.device("meta"), "int8")
    assert cli.main(["convert", "--from-checkpoint", str(float_checkpoint[0]), "--out", "x",
                     "--quantize", "int4", "--group-size", "48"]) == 2
    assert "--group-size 48" in capsys.readouterr().err


def test_a_float_model_larger_than_memory_is_refused_with_the_way_out(tmp_path: Path, monkeypatch):
    hf = write_official(tmp_path / "hf", _hf_config())
    monkeypatch.setattr(loading, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match="--quantize int8"):
        load_for_inference(hf, "cpu")
    model, _, _ = load_for_inference(hf, "cpu", "int8")  # quantized while streamed: no float model whole
    assert isinstance(model.layers[0].mlp.down_proj, QuantizedLinear)


# ------------------------------------------------------------------------------------------------ quality
def _logit_agreement(model: Transformer, quantized: Transformer, ids: torch.Tensor) -> tuple[float, float]:
    """(KL(float || quantized) in nats per token, top-1 agreement)."""
    with torch.no_grad():
        ref, out = model(ids).logits.flatten(0, 1).float(), quantized(ids).logits.flatten(0, 1).float()
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return kl, (out.argmax(-1) == ref.argmax(-1)).float().mean().item()


# (preset, format) -> (largest KL per token, smallest top-1 agreement); the presets' own init (std 0.006) gives
# near-uniform logits, so top-1 measures near-ties: measured int8 1.6e-7 / 0.96 (tiny), 2.7e-6 / 0.93 (small),
# int4 6e-5 / 0.66 (tiny), 6.6e-4 / 0.37 (small).
BOUNDS = {("tiny-deepseekmoe", "int8"): (2e-6, 0.9), ("tiny-deepseekmoe", "int4"): (5e-4, 0.5),
          ("small-deepseekmoe", "int8"): (3e-5, 0.85), ("small-deepseekmoe", "int4"): (5e-3, 0.25)}


@pytest.mark.parametrize("preset", ["tiny-deepseekmoe", pytest.param("small-deepseekmoe", marks=pytest.mark.slow)])
def test_quantized_logits_stay_within_the_bounds(preset):
    model = Transformer(load_preset(preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 48))
    for fmt in ("int8", "int4"):
        kl, top1 = _logit_agreement(model, _quantized_copy(model, fmt), ids)
        max_kl, min_top1 = BOUNDS[preset, fmt]
        assert kl <= max_kl and top1 >= min_top1, (fmt, kl, top1)


def test_eval_runs_quantized_close_to_float(tmp_path: Path, capsys):
    hf = write_official(tmp_path / "hf", _hf_config())
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(f"w{i % 60 + 2}" for i in range(400)))
    losses = {}
    for fmt in (None, "int8"):
        extra = ["--quantize", fmt] if fmt else []
        assert cli.main(["eval", str(hf), "--data", str(text), "--json", "--seq-len", "32", "--device", "cpu",
                         *extra]) == 0
        losses[fmt] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert abs(losses["int8"] - losses[None]) < 0.01 * losses[None]


def test_the_16b_in_bf16_on_cuda_runs_the_grouped_gemm():
    """The GPU path, checked without a GPU: the 16B's experts pick torch's grouped GEMM on CUDA in bf16 (and the
    per-expert kernel on the CPU), quantized experts always the per-expert kernel."""
    from deepseekmoe.model.experts import choose_kernel

    c = load_preset("deepseekmoe-16b")
    assert choose_kernel("cuda", torch.bfloat16, c.hidden_size, c.moe_intermediate_size) == "grouped_mm"
    assert choose_kernel("cpu", torch.bfloat16, c.hidden_size, c.moe_intermediate_size) == "per_expert"


def test_int4_is_repacked_in_row_blocks_like_at_once(monkeypatch):
    import deepseekmoe.model.quantized as quantized

    q, s = quantize(torch.randn(3 * 64 + 16, 128), "int4", 64)
    whole = QuantizedWeight.from_stored(q, s, torch.float32)
    monkeypatch.setattr(quantized, "PACK_ROWS", 64)
    assert torch.equal(QuantizedWeight.from_stored(q, s, torch.float32).data, whole.data)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_server_runs_a_quantized_model_as_it_generates_alone(fmt):
    """A quantized model behind the live server (continuous batching, per-row KV cache) answers each of several
    concurrent greedy requests with the tokens that full forwards of the same quantized model give."""
    from concurrent.futures import ThreadPoolExecutor

    from deepseekmoe.inference.engine import Engine
    from deepseekmoe.inference.server import Settings
    from live_server import Live, reference, tiny_model, tokenizer

    tok = tokenizer()
    quantized = _quantized_copy(tiny_model(tok), fmt, group_size=32).eval()
    server = Live(Engine(quantized, tok, max_batch_size=4), Settings("tiny", 64))
    try:
        prompts = ["the quick", "héllo", "lazy dog. the", "over"]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: server.client.completions.create(
                model="tiny", prompt=p, max_tokens=8, temperature=0), prompts))
        for prompt, answer in zip(prompts, answers):
            ids = [server.api.bos] + tok.encode(prompt, add_special_tokens=False).ids
            want = reference(quantized, ids, 8)
            assert answer.choices[0].text == tok.decode(want)
            assert answer.usage.completion_tokens == len(want)
    finally:
        server.close()
