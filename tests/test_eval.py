"""Held-out loss, perplexity and bits per byte: hand computations, byte counting, and the eval command."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deepseekmoe import Transformer
from deepseekmoe.eval.perplexity import EvalResult, evaluate, token_byte_lengths
from deepseekmoe.losses import lm_loss
from deepseekmoe.checkpoint import save_model
from deepseekmoe.train.config import TrainConfig
from deepseekmoe.train.trainer import validation_metrics
from test_generate import CORPUS, make_checkpoint, run_cli, train_tokenizer

TEXT = "Mixture of experts: naïve café → 日本語 🎉\n    return a + b\n"


def write_data_dir(path: Path, tok_path: Path, val_ids: list[int]) -> Path:
    """A data directory as `deepseekmoe prepare` writes it (see the data contract), with a given val stream."""
    path.mkdir()
    (path / "tokenizer.json").write_bytes(tok_path.read_bytes())
    np.asarray(val_ids, dtype=np.uint16).tofile(path / "val.bin")
    np.asarray(val_ids[:10], dtype=np.uint16).tofile(path / "train.bin")
    split = {"tokens": len(val_ids), "bytes": 0, "documents": 1}
    meta = {"format": 1, "vocab_size": 300, "dtype": "uint16", "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 2, "tokenizer_sha256": "", "sources": [],
            "splits": {"train": dict(split, tokens=10), "val": split}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_perplexity_and_bits_per_byte_by_hand():
    r = EvalResult(loss=2.0, tokens=3, bytes=6)
    assert r.perplexity == pytest.approx(math.e ** 2)
    assert r.bits_per_byte == pytest.approx(1 / math.log(2))  # 2 nats * 3 tokens = 6 nats over 6 bytes
    r = EvalResult(loss=1.5, tokens=1000, bytes=4000)  # 1500 nats = 2164.04 bits over 4000 bytes
    assert r.bits_per_byte == pytest.approx(0.541011, abs=1e-6)
    assert set(r.to_dict()) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}


def test_token_byte_lengths_count_utf8_bytes_exactly(tmp_path):
    tok = train_tokenizer(tmp_path / "tok.json")
    lengths = token_byte_lengths(tok)
    ids = tok.encode(TEXT).ids
    assert lengths[ids].sum() == len(TEXT.encode("utf-8"))
    assert lengths[[0, 1, 2]].tolist() == [0, 0, 0]  # <bos>, <eos>, <pad>
    lead_bytes = [i for i in ids if tok.id_to_token(i) == "æ"]  # 0xE6 alone, the first byte of 日 and 本
    assert len(lead_bytes) == 2 and lengths[lead_bytes].tolist() == [1, 1]
    longest = max(ids, key=lambda i: len(tok.id_to_token(i)))  # a merged, ASCII token such as " return"
    assert lengths[longest] == len(tok.decode([longest]).encode("utf-8")) > 3


@torch.no_grad()
def test_evaluate_equals_lm_loss_over_the_same_windows(make_config):
    model = Transformer(make_config()).eval()
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 45)
    lengths = np.arange(model.config.vocab_size) % 4  # any per-token byte table
    seq_len = 8  # windows t[8k : 8k + 9] for k < 44 // 8 = 5; tokens 41..44 are not scored
    losses, byte_counts = [], []
    for k in range(5):
        window = torch.from_numpy(tokens[8 * k:8 * k + 9]).long()[None]
        losses.append(lm_loss(model(window[:, :-1]).logits, window[:, 1:]).item())
        byte_counts.append(lengths[tokens[8 * k + 1:8 * k + 9]].sum())
    result = evaluate(model, tokens, lengths, batch_size=3, seq_len=seq_len)
    assert result.tokens == 40 and result.bytes == sum(byte_counts)
    assert result.loss == pytest.approx(np.mean(losses), rel=1e-6)
    first = evaluate(model, tokens, lengths, batch_size=3, seq_len=seq_len, max_batches=1)
    assert first.tokens == 24 and first.loss == pytest.approx(np.mean(losses[:3]), rel=1e-6)
    short = evaluate(model, tokens[:6], lengths, seq_len=seq_len)  # shorter than a window: one window of 5
    window = torch.from_numpy(tokens[:6]).long()[None]
    assert short.tokens == 5
    assert short.loss == pytest.approx(lm_loss(model(window[:, :-1]).logits, window[:, 1:]).item(), rel=1e-6)


@torch.no_grad()
def test_bits_per_byte_by_hand_at_the_window_boundaries_in_eval_and_the_trainer(make_config):
    model = Transformer(make_config()).eval()
    model.lm_head.weight.zero_()  # uniform predictions: every predicted token costs ln V nats
    v = model.config.vocab_size
    tokens = np.array([0, 5, 6, 7, 8, 9, 10, 11])  # seq_len 3: windows t[0:4], t[3:7] predict t[1..6]; t[7] is left
    lengths = np.zeros(v, dtype=np.int64)
    lengths[5:12] = [1, 2, 3, 4, 1, 2, 100]  # bytes each token spells; the unscored last one must not count
    result = evaluate(model, tokens, lengths, batch_size=1, seq_len=3)
    assert result.tokens == 6 and result.bytes == 13
    assert result.bits_per_byte == pytest.approx(6 * math.log(v) / math.log(2) / 13, rel=1e-6)
    val = validation_metrics(model, tokens, TrainConfig(batch_size=1, seq_len=3), lengths)
    assert val == {"val_loss": result.loss, "val_bpb": result.bits_per_byte, "val_tokens": 6}


def test_eval_command_json_on_a_text_file(tmp_path, make_config, capsys):
    ckpt, model, tok = make_checkpoint(tmp_path, make_config)
    (tmp_path / "heldout.txt").write_text(TEXT, encoding="utf-8")
    code, out, _ = run_cli(capsys, "eval", ckpt, "--data", tmp_path / "heldout.txt", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens"}
    ids = [0] + tok.encode(TEXT).ids + [1]  # one document: bos + text + eos, all of it in one window
    assert result["tokens"] == len(ids) - 1
    assert result["bytes"] == len(TEXT.encode("utf-8"))
    with torch.no_grad():
        window = torch.tensor([ids])
        loss = lm_loss(model(window[:, :-1]).logits, window[:, 1:]).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss * result["tokens"] / (result["bytes"] * math.log(2)),
                                                    rel=1e-5)
    code, text_out, _ = run_cli(capsys, "eval", ckpt, "--data", tmp_path / "heldout.txt")
    assert code == 0 and "bits per byte" in text_out and f"{result['loss']:.4f}" in text_out


def test_eval_command_on_a_run_uses_its_recorded_data_and_seq_len(tmp_path, make_config, capsys):
    _, model, tok = make_checkpoint(tmp_path, make_config)
    val = [0] + tok.encode(CORPUS[:400]).ids + [1]
    data_dir = write_data_dir(tmp_path / "data", tmp_path / "tok.json", val)
    run_dir = tmp_path / "run"
    save_model(model, run_dir / "checkpoints" / "step_00000010", tmp_path / "tok.json")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"preset": None, "data": str(data_dir), "out": None,
                                                         "model": {}, "train": {"seq_len": 16}}))
    code, out, _ = run_cli(capsys, "eval", run_dir, "--json", "--batch-size", 2)
    assert code == 0
    expected = evaluate(model, np.asarray(val), token_byte_lengths(tok), batch_size=2, seq_len=16)
    got = json.loads(out)
    assert got["tokens"] == expected.tokens == (len(val) - 1) // 16 * 16
    assert got["loss"] == pytest.approx(expected.loss, rel=1e-5)
    code, out, _ = run_cli(capsys, "eval", run_dir, "--json", "--data", data_dir, "--seq-len", 8,
                           "--max-batches", 1, "--batch-size", 2)
    assert code == 0 and json.loads(out)["tokens"] == 16


def test_eval_command_errors_are_one_line(tmp_path, make_config, capsys):
    ckpt, _, _ = make_checkpoint(tmp_path, make_config)
    other = train_tokenizer(tmp_path / "other.json", vocab_size=280)
    foreign = write_data_dir(tmp_path / "foreign", tmp_path / "other.json", [0] + other.encode(TEXT).ids)
    bare = save_model(Transformer(make_config()), tmp_path / "no_tok")
    (tmp_path / "t.txt").write_text(TEXT)
    cases = [
        (["eval", tmp_path / "missing", "--data", tmp_path / "t.txt"], "no such checkpoint"),
        (["eval", bare, "--data", tmp_path / "t.txt"], "tokenizer.json"),
        (["eval", ckpt], "--data"),
        (["eval", ckpt, "--data", tmp_path / "nope"], "no such data directory or text file"),
        (["eval", ckpt, "--data", foreign], "different tokenizer"),
        (["eval", ckpt, "--data", tmp_path / "t.txt", "--seq-len", 0], "--seq-len=0"),
        (["eval", ckpt, "--data", tmp_path / "t.txt", "--seq-len", 500], "max_position_embeddings"),
    ]
    for argv, needle in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("deepseekmoe: error:") and needle in err, err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_checkpoint_is_one_line_in_every_command(tmp_path, make_config, capsys, damage):
    """A truncated or garbage model.safetensors: eval, generate, analyze and convert each print one line naming
    the file (no SafetensorError traceback) and exit 2."""
    import shutil

    ckpt, _, _ = make_checkpoint(tmp_path, make_config)
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-64] if damage == "truncated" else b"not a safetensors file at all")
    (tmp_path / "t.txt").write_text(TEXT)
    commands = [
        ["eval", ckpt, "--data", tmp_path / "t.txt"],
        ["generate", ckpt, "--prompt", "The", "--max-new-tokens", 2],
        ["analyze", ckpt, "--data", tmp_path / "t.txt", "--out", tmp_path / "an"],
        ["convert", "--to-hf", ckpt, "--out", tmp_path / "hf"],
    ]
    for argv in commands:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert err.count("\n") == 1 and err.startswith("deepseekmoe: error:") and str(path) in err, (argv, err)
    assert not (tmp_path / "hf").exists()
    shutil.rmtree(tmp_path / "an", ignore_errors=True)
