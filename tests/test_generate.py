"""Sampling functions, generation with and without the KV cache, streaming text, and the generate command."""

import io
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseekmoe import Transformer, cli
from deepseekmoe.inference import TextStream, generate
from deepseekmoe.inference.sampling import (greedy, logits_to_probs, sample, sample_from_probs, top_k_filter,
                                            top_p_filter)
from deepseekmoe.checkpoint import save_model

CORPUS = ("The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
          "Mixture of experts routes each token to a few experts. ") * 40


def train_tokenizer(path: Path, vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE tokenizer with <bos>=0, <eos>=1, <pad>=2, trained on a few KB of text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(path))
    return tok


def make_checkpoint(tmp_path: Path, make_config, **overrides) -> tuple[Path, Transformer, Tokenizer]:
    tok = train_tokenizer(tmp_path / "tok.json")
    config = make_config(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=1, **overrides)
    model = Transformer(config).eval()
    ckpt = save_model(model, tmp_path / "ckpt", tmp_path / "tok.json")
    return ckpt, model, tok


def reference_generate(model: Transformer, prompt: list[int], n: int, temperature: float = 0.0,
                       seed: int | None = None, **filters) -> list[int]:
    """No cache: rerun the whole sequence through the model for every new token."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[:, -1]
            ids.append(int(sample(logits, temperature, generator=gen, **filters)[0]))
    return ids[len(prompt):]


# ------------------------------------------------------------------ sampling functions
def test_temperature_zero_is_greedy_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    assert greedy(logits).tolist() == [1, 0]
    assert sample(logits, temperature=0, top_k=3, top_p=0.5).tolist() == [1, 0]


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0, 5.0]])
    kept = torch.isfinite(top_k_filter(logits, 3))
    assert kept.sum().item() == 3 and kept[0, 4]
    assert torch.equal(top_k_filter(logits, 3)[kept], logits[kept])
    probs = logits_to_probs(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), top_k=2)
    e = math.exp(1.0)
    torch.testing.assert_close(probs, torch.tensor([[e / (e + 1), 1 / (e + 1), 0.0, 0.0]]))


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])  # sorted: 0.5, 0.25, 0.15, 0.1
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.25 = 0.75 is the first sum >= 0.7
    assert kept(0.8) == [False, True, True, True]  # needs 0.15 too (0.9)
    assert kept(0.95) == [True, True, True, True]
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.7), torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3]]))


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 0.0]])
    p1, p_half, p2 = (logits_to_probs(logits, t)[0, 0].item() for t in (1.0, 0.5, 2.0))
    assert p1 == pytest.approx(1 / (1 + math.exp(-2)))
    assert p_half == pytest.approx(1 / (1 + math.exp(-4)))
    assert p2 == pytest.approx(1 / (1 + math.exp(-1)))


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0]).expand(20000, 4).contiguous()
    draws = sample_from_probs(probs, torch.Generator().manual_seed(7))
    again = sample_from_probs(probs, torch.Generator().manual_seed(7))
    assert torch.equal(draws, again)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    assert freq[3] == 0


def test_bad_sampling_settings_are_rejected(make_config):
    model = Transformer(make_config()).eval()
    for kw, msg in (({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")):
        with pytest.raises(ValueError, match=msg):
            generate(model, [1, 2], 3, **kw)


# ------------------------------------------------------------------ generation
@pytest.mark.parametrize("overrides", [{}, {"router": "hash", "num_experts_per_tok": 1, "n_shared_experts": 0},
                                       {"num_key_value_heads": 2, "router": "none", "n_routed_experts": None}])
def test_greedy_with_cache_equals_no_cache_reference(make_config, overrides):
    model = Transformer(make_config(**overrides)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (9,)).tolist()
    expected = reference_generate(model, prompt, 20)
    assert generate(model, prompt, 20, temperature=0) == expected
    assert generate(model, prompt, 20, temperature=0, prefill_chunk_size=4) == expected
    assert len(set(expected)) > 1  # a degenerate constant output would prove little


def test_seeded_sampling_with_cache_equals_no_cache_reference(make_config):
    model = Transformer(make_config()).eval()
    prompt = [5, 17, 3]
    expected = reference_generate(model, prompt, 15, temperature=1.3, seed=11, top_k=40, top_p=0.9)
    got = generate(model, prompt, 15, temperature=1.3, top_k=40, top_p=0.9, seed=11)
    assert got == expected
    assert got == generate(model, prompt, 15, temperature=1.3, top_k=40, top_p=0.9, seed=11, stream=lambda t: None)
    assert got != generate(model, prompt, 15, temperature=1.3, top_k=40, top_p=0.9, seed=12)


def test_generation_stops_at_eos_and_streams_every_token(make_config):
    model = Transformer(make_config()).eval()
    prompt = [4, 8, 15, 16]
    free = generate(model, prompt, 12, temperature=0)
    eos = free[5]
    first = free.index(eos)
    streamed: list[int] = []
    out = generate(model, prompt, 12, temperature=0, eos_token_id=eos, stream=streamed.append)
    assert out == free[:first + 1] and out[-1] == eos
    assert streamed == out


def test_context_limit(make_config):
    model = Transformer(make_config(max_position_embeddings=16)).eval()
    assert len(generate(model, list(range(10)), 7, temperature=0)) == 7  # 10 + 7 - 1 = 16 positions fit
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        generate(model, list(range(10)), 8)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    assert generate(model, [1], 0) == []


# ------------------------------------------------------------------ text streaming
def test_text_stream_holds_back_split_characters(tmp_path):
    tok = train_tokenizer(tmp_path / "tok.json")
    text = "naïve café → 日本語 🎉 fox"
    ids = tok.encode(text).ids
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens
    pieces: list[str] = []
    stream = TextStream(tok, pieces.append)
    for i in ids:
        stream(i)
    stream.finish()
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# ------------------------------------------------------------------ the command
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_command_streams_the_generated_text(tmp_path, make_config, capsys):
    ckpt, model, tok = make_checkpoint(tmp_path, make_config)
    prompt = "The quick brown"
    ids = [0] + tok.encode(prompt).ids  # bos first, as training documents begin
    expected_ids = generate(model, ids, 12, temperature=0, eos_token_id=1)
    code, out, err = run_cli(capsys, "generate", ckpt, "--prompt", prompt, "--max-new-tokens", 12,
                             "--temperature", 0)
    assert code == 0
    assert out == prompt + tok.decode(expected_ids) + "\n"
    assert "tokens/s" in err
    code, out, _ = run_cli(capsys, "generate", ckpt, "--prompt", prompt, "--max-new-tokens", 12,
                           "--temperature", 0, "--no-echo")
    assert out == tok.decode(expected_ids) + "\n"


def test_generate_command_reads_prompt_file_and_stdin(tmp_path, make_config, capsys, monkeypatch):
    ckpt, _, _ = make_checkpoint(tmp_path, make_config)
    (tmp_path / "p.txt").write_text("def add(a, b):")
    args = ["--max-new-tokens", 5, "--temperature", 0.7, "--seed", 3]
    code, from_file, _ = run_cli(capsys, "generate", ckpt, "--prompt-file", tmp_path / "p.txt", *args)
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):"))
    code2, from_stdin, _ = run_cli(capsys, "generate", ckpt, "--prompt-file", "-", *args)
    _, from_arg, _ = run_cli(capsys, "generate", ckpt, "--prompt", "def add(a, b):", *args)
    assert code == code2 == 0
    assert from_file == from_stdin == from_arg and from_arg.startswith("def add(a, b):")


def test_generate_command_errors_are_one_line(tmp_path, make_config, capsys):
    ckpt, _, _ = make_checkpoint(tmp_path, make_config, max_position_embeddings=8)
    bare = save_model(Transformer(make_config()), tmp_path / "no_tok")
    cases = [
        (["generate", tmp_path / "missing", "--prompt", "x"], "no such checkpoint"),
        (["generate", ckpt, "--prompt", "fox " * 20], "the prompt is"),
        (["generate", bare, "--prompt", "x"], "tokenizer.json"),
        (["generate", ckpt], "--prompt"),
        (["generate", ckpt, "--prompt", "x", "--top-p", 0], "top_p"),
        (["generate", ckpt, "--prompt-file", tmp_path / "nope.txt"], "prompt file not found"),
        (["generate", ckpt, "--prompt", "x", "--max-new-tokens", -5], "max_new_tokens=-5 must be at least 1"),
        (["generate", ckpt, "--prompt", "x", "--temperature", "nan"], "temperature=nan must be a finite number"),
        (["generate", ckpt, "--prompt", "x", "--temperature", "inf"], "temperature=inf must be a finite number"),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert out == ""  # nothing half-written
        assert err.count("\n") == 1 and err.startswith("deepseekmoe: error:") and needle in err, err


def test_a_bad_device_is_one_line(tmp_path, make_config, capsys):
    import torch

    ckpt, _, _ = make_checkpoint(tmp_path, make_config)
    cases = [("foo", "--device='foo' is not a device")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "no CUDA device is available"))
    for device, needle in cases:
        code, out, err = run_cli(capsys, "generate", ckpt, "--prompt", "The", "--device", device)
        assert code == 2 and err.count("\n") == 1 and needle in err, err
