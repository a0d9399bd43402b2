"""Data pipeline: corpus reading, prepare (tokenizer, splits, no-op re-runs, errors, atomicity), batches."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from deepseekmoe import cli
from deepseekmoe.data import prepare as prepare_mod
from deepseekmoe.data.corpus import (ReadStats, decode_utf8, expand_sources, iter_documents, split_text)
from deepseekmoe.data.dataset import PackedBatches, eval_batches, open_split, read_meta
from deepseekmoe.data.prepare import choose_validation, prepare
from deepseekmoe.data.tokenizer import file_sha256, load_tokenizer, token_dtype

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega expert router token shared routed balance").split()


def make_docs(n: int, start: int = 0) -> list[str]:
    return [f"Document {i}.\n" + " ".join(WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(30 + i))
            + "\n" for i in range(start, start + n)]


def write_corpus(root: Path) -> list[str]:
    """24 documents: .txt, nested .md, .jsonl.gz (with a blank line), a .py.gz; plus files that must be skipped."""
    docs = make_docs(24)
    (root / "a" / "b").mkdir(parents=True)
    for i in range(10):
        (root / "a" / f"doc{i:02d}.txt").write_text(docs[i])
    for i in range(10, 15):
        (root / "a" / "b" / f"doc{i}.md").write_text(docs[i])
    with gzip.open(root / "a" / "records.jsonl.gz", "wt") as f:
        for i in range(15, 23):
            f.write(json.dumps({"text": docs[i], "id": i}) + ("\n\n" if i == 17 else "\n"))
    with gzip.open(root / "a" / "b" / "mod.py.gz", "wt") as f:
        f.write(docs[23])
    (root / "a" / "skip.bin").write_bytes(b"\x00\x01")
    (root / "a" / ".hidden.txt").write_text("hidden\n")
    return docs


def split_documents(data_dir: Path, split: str) -> list[str]:
    """Decode a split file back into its documents (checks the bos ... eos framing on the way)."""
    meta = read_meta(data_dir)
    tok = load_tokenizer(data_dir / "tokenizer.json")
    ids = open_split(data_dir, split).tolist()
    bos, eos = meta["bos_token_id"], meta["eos_token_id"]
    docs, i = [], 0
    while i < len(ids):
        assert ids[i] == bos
        j = ids.index(eos, i + 1)
        docs.append(tok.decode(ids[i + 1:j]))
        i = j + 1
    return docs


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "corpus"
    return root, write_corpus(root)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["prepare", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---- corpus reading ---------------------------------------------------------------------------------------------

def test_directory_and_glob_expansion(corpus, tmp_path):
    root, _ = corpus
    names = [p.path.name for p in expand_sources([str(root)])]
    assert sorted(names) == sorted([f"doc{i:02d}.txt" for i in range(10)] + [f"doc{i}.md" for i in range(10, 15)]
                                   + ["records.jsonl.gz", "mod.py.gz"])
    globbed = expand_sources([str(root / "a" / "doc0*.txt"), str(root / "**" / "*.md")])
    assert [p.path.name for p in globbed] == [f"doc0{i}.txt" for i in range(10)] + [f"doc{i}.md" for i in
                                                                                      range(10, 15)]
    # a file named twice is read once; a file named explicitly is read whatever its suffix
    (tmp_path / "README").write_text("plain\n")
    twice = expand_sources([str(root / "a" / "doc00.txt"), str(root / "a" / "doc00.txt"), str(tmp_path / "README")])
    assert [(p.path.name, p.kind) for p in twice] == [("doc00.txt", "text"), ("README", "text")]
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_sources([str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match="matches no readable files"):
        expand_sources([str(tmp_path / "nothing-*.txt")])


def test_reads_gz_and_jsonl_documents(corpus):
    root, docs = corpus
    stats = ReadStats()
    got = list(iter_documents(expand_sources([str(root)]), stats))
    assert sorted(got) == sorted(docs)
    assert stats.replaced_total == 0


def test_invalid_utf8_is_replaced_and_counted():
    text, bad = decode_utf8(b"ok \xff\xfe then \xe2\x82 end \xef\xbf\xbd")  # 2 bad bytes, a truncated char, a real U+FFFD
    assert text == "ok \ufffd\ufffd then \ufffd end \ufffd"
    assert bad == 3
    assert decode_utf8("héllo".encode()) == ("héllo", 0)


def test_split_text_is_lossless_and_bounded():
    text = "".join(f"line {i} " + "x" * (i % 50) + ("\n\n" if i % 7 == 0 else "\n") for i in range(3000))
    pieces = split_text(text, max_chars=1000)
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces) and len(pieces) > 50
    assert all(p.endswith("\n") for p in pieces)
    assert split_text("x" * 2500, max_chars=1000) == ["x" * 1000, "x" * 1000, "x" * 500]  # no newline: hard cuts


# ---- batches ----------------------------------------------------------------------------------------------------

def test_packed_batches_targets_are_inputs_shifted_by_one():
    tokens = (np.arange(1000) * 7 % 65521).astype(np.uint16)
    batches = PackedBatches(tokens, batch_size=3, seq_len=7, seed=5)
    for index in (0, 1, 41):
        x, y = batches.batch(index)
        assert x.shape == y.shape == (3, 7) and x.dtype == y.dtype == torch.int64
        for row, start in zip(range(3), batches.window_starts(index)):
            assert x[row].tolist() == tokens[start:start + 7].tolist()
            assert y[row].tolist() == tokens[start + 1:start + 8].tolist()


def test_packed_batches_deterministic_in_seed_and_index():
    tokens = np.arange(5000, dtype=np.uint16)
    a = PackedBatches(tokens, batch_size=4, seq_len=15, seed=3)
    b = PackedBatches(tokens, batch_size=4, seq_len=15, seed=3)
    later = b.batch(200)[0]  # out of order, other epoch first: no hidden state
    for index in (0, 7, 200):
        assert a.batch(index)[0].equal(b.batch(index)[0])
    assert a.batch(200)[0].equal(later)
    assert not a.batch(0)[0].equal(PackedBatches(tokens, 4, 15, seed=4).batch(0)[0])


def test_packed_batches_cover_an_epoch_without_overlap():
    tokens = np.arange(1003, dtype=np.uint16)  # 125 windows of 8, 3 spare tokens
    batches = PackedBatches(tokens, batch_size=5, seq_len=7, seed=0)
    assert batches.num_windows == 125 and batches.batches_per_epoch == 25
    for epoch in range(2):
        starts = sorted(s for i in range(25 * epoch, 25 * (epoch + 1)) for s in batches.window_starts(i))
        assert len(set(starts)) == 125
        assert np.all(np.diff(starts) == 8)  # disjoint windows tiling the stream
        assert 0 <= starts[0] <= 3 and starts[-1] + 8 <= 1003
    first = [s for i in range(25) for s in batches.window_starts(i)]
    second = [s for i in range(25, 50) for s in batches.window_starts(i)]
    assert first != second  # a new order each epoch


def test_packed_batches_too_small():
    with pytest.raises(ValueError, match="too small for one window of 17 tokens"):
        PackedBatches(np.arange(16, dtype=np.uint16), batch_size=1, seq_len=16, seed=0)


def test_eval_batches_sequential():
    tokens = np.arange(100, dtype=np.uint32)
    batches = list(eval_batches(tokens, batch_size=3, seq_len=12))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 2]  # 8 windows of 12 (+1); last batch partial
    inputs = np.concatenate([x.reshape(-1).numpy() for x, _ in batches])
    targets = np.concatenate([y.reshape(-1).numpy() for _, y in batches])
    assert inputs.tolist() == list(range(96)) and targets.tolist() == list(range(1, 97))
    assert len(list(eval_batches(tokens, 3, 12, max_batches=2))) == 2
    with pytest.raises(ValueError, match="too small"):
        next(eval_batches(tokens[:10], 1, 12))


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(102400) == np.uint32


# ---- prepare ----------------------------------------------------------------------------------------------------

def test_prepare_end_to_end(corpus, tmp_path, capsys):
    root, docs = corpus
    bad = "Broken bytes here. " * 5
    (root / "a" / "latin1.txt").write_bytes(bad.encode() + b"caf\xe9 na\xefve\n")
    out = tmp_path / "data"
    rc, stdout, err = run_cli(capsys, str(root), "--out", str(out), "--vocab-size", "320", "--val-fraction", "0.1")
    assert rc == 0, err
    assert "replaced 2 invalid UTF-8" in err
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 320 and meta["invalid_utf8_replaced"] == 2
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["pad_token_id"]) == (0, 1, 2)
    assert meta["tokenizer_sha256"] == file_sha256(out / "tokenizer.json")
    all_docs = docs + [bad + "caf\ufffd na\ufffdve\n"]
    train, val = split_documents(out, "train"), split_documents(out, "val")
    assert sorted(train + val) == sorted(all_docs)  # every document exactly once, exact round trip
    assert not set(train) & set(val) and val
    for name, split_docs in (("train", train), ("val", val)):
        counts = meta["splits"][name]
        assert counts["documents"] == len(split_docs)
        assert counts["bytes"] == sum(len(d.encode()) for d in split_docs)
        assert counts["tokens"] == len(open_split(out, name))
    val_bytes = meta["splits"]["val"]["bytes"]
    assert 0.1 * sum(len(d.encode()) for d in all_docs) <= val_bytes
    assert f"val {meta['splits']['val']['tokens']:,} tokens" in stdout


def test_split_is_deterministic_and_content_based(corpus, tmp_path):
    root, _ = corpus
    files = [str(p.path) for p in expand_sources([str(root)])]
    a = prepare(files, tmp_path / "a", vocab_size=300, val_fraction=0.2)
    b = prepare(files[::-1], tmp_path / "b", vocab_size=300, val_fraction=0.2)
    assert sorted(split_documents(a, "val")) == sorted(split_documents(b, "val"))
    c = prepare(files, tmp_path / "c", vocab_size=300, val_fraction=0.2)
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (a / name).read_bytes() == (c / name).read_bytes()


def test_one_large_file_is_cut_into_documents(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")  # restored afterwards; --workers sets it
    paragraphs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(60)) for i in range(2000)]
    text = "\n\n".join(paragraphs) + "\n"  # ~700 KB
    pieces = split_text(text)
    assert len(pieces) == 11 and all(len(p) <= 64 * 1024 for p in pieces)
    (tmp_path / "book.txt").write_text(text)
    out = tmp_path / "data"
    rc, _, err = run_cli(capsys, str(tmp_path / "book.txt"), "--out", str(out), "--vocab-size", "300",
                         "--val-fraction", "0.05", "--workers", "1")
    assert rc == 0, err
    meta = read_meta(out)
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (10, 1)
    assert sorted(split_documents(out, "train") + split_documents(out, "val")) == sorted(pieces)


def test_choose_validation_rules():
    # target 10% of 1000 bytes: the hash order is 3, 1, 0, 2; doc 3 (600 bytes) is passed over for smaller ones
    keys, sizes = [30, 20, 40, 10], [100, 50, 250, 600]
    assert choose_validation(keys, sizes, 0.1) == [True, True, False, False]
    # only huge documents: the first in hash order is taken, and never all of them
    assert choose_validation([2, 1], [500, 500], 0.01) == [False, True]
    assert choose_validation([2, 1], [500, 500], 0.99) == [False, True]
    with pytest.raises(ValueError, match="too small for a train/validation split: 1 document"):
        choose_validation([1], [100], 0.1)


def test_rerun_is_a_noop_until_input_changes(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "data"
    args = (str(root), "--out", str(out), "--vocab-size", "300")
    assert run_cli(capsys, *args)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    time.sleep(0.01)
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0 and "up to date" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (root / "a" / "doc03.txt").write_text("A changed document.\n" * 20)
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0 and "up to date" not in err
    assert "A changed document.\n" * 20 in split_documents(out, "train") + split_documents(out, "val")
    rc, _, err = run_cli(capsys, *args, "--vocab-size", "310")  # other options: rebuilt
    assert rc == 0 and "up to date" not in err and read_meta(out)["vocab_size"] == 310


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or directory"),
    ("no-match", "matches no readable files"),
    ("empty", "no text found"),
    ("one-doc", "too small for a train/validation split"),
    ("bad-gz", "cannot read"),
    ("truncated-gz", "cannot read"),
    ("corrupt-gz", "cannot read"),
    ("bad-jsonl", "invalid JSON"),
    ("not-data-dir", "is not a data directory"),
    ("small-vocab", "vocab_size=100 is too small"),
    ("workers", "--workers 0 must be at least 1"),
])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, case, message):
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "out"
    extra: list[str] = []
    if case == "no-match":
        (src / "data.bin").write_bytes(b"\x00")
    elif case == "empty":
        (src / "a.txt").write_text("  \n")
    elif case in ("one-doc", "not-data-dir", "small-vocab", "workers"):
        (src / "a.txt").write_text("just one short document\n")
        if case == "not-data-dir":
            out.mkdir()
            (out / "precious.txt").write_text("keep me")
        extra = {"small-vocab": ["--vocab-size", "100"], "workers": ["--workers", "0"]}.get(case, [])
    elif case == "bad-gz":
        (src / "a.txt.gz").write_bytes(b"this is not gzip data")
    elif case in ("truncated-gz", "corrupt-gz"):
        data = bytearray(gzip.compress(("some text " * 2000).encode()))
        if case == "corrupt-gz":
            data[20:40] = b"\xff" * 20
        (src / "a.txt.gz").write_bytes(bytes(data[:-30] if case == "truncated-gz" else data))
    elif case == "bad-jsonl":
        (src / "a.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    target = str(src / "missing") if case == "missing" else str(src)
    rc, _, err = run_cli(capsys, target, "--out", str(out), *extra)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepseekmoe: error:") and message in lines[0], err
    if case == "not-data-dir":
        assert (out / "precious.txt").read_text() == "keep me"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"] or case == "not-data-dir"


@pytest.mark.parametrize("case", ["notes-beside-data", "source-inside-out", "out-is-source"])
def test_prepare_never_deletes_what_it_did_not_write(tmp_path, capsys, case):
    """A data directory that also holds other files, or an --out that contains the corpus, is refused with one
    line, and every file is still there."""
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"document {i} " * 30 + "\n")
    out = tmp_path / "data"
    if case == "notes-beside-data":
        assert run_cli(capsys, str(src), "--out", str(out), "--vocab-size", "300")[0] == 0
        (out / "NOTES.md").write_text("mine")
        (src / "doc0.txt").write_text("changed " * 30)  # so the run would rebuild
    elif case == "source-inside-out":
        out = tmp_path
    else:
        out = src
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc, _, err = run_cli(capsys, str(src), "--out", str(out), "--vocab-size", "300")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("deepseekmoe: error:"), err
    assert ("NOTES.md" if case == "notes-beside-data" else "is not a data directory") in lines[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_output_containing_an_input_is_refused(tmp_path):
    """Even a directory that holds only data files is not replaced when an input lies inside it."""
    from deepseekmoe.data.corpus import InputFile

    inside = InputFile(tmp_path / "out" / "sub" / "a.txt", "text")
    with pytest.raises(ValueError, match="contains the input"):
        prepare_mod.check_inputs_outside(tmp_path / "out", [inside])
    prepare_mod.check_inputs_outside(tmp_path / "other", [inside])  # elsewhere: fine


def deepseek_style_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer with 70,000 ids and the DeepSeek special token names (ids above 65,535)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({f"filler{i}": i for i in range(len(alphabet), 70_000)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"])
    tok.save(str(path))
    return path


def test_reuses_a_given_tokenizer(corpus, tmp_path):
    root, docs = corpus
    tok_path = deepseek_style_tokenizer(tmp_path / "ds.json")
    out = prepare([str(root)], tmp_path / "data", tokenizer=str(tok_path), val_fraction=0.1)
    meta = read_meta(out)
    assert meta["vocab_size"] == 70_002 and meta["dtype"] == "uint32"
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["pad_token_id"]) == (70_000, 70_001, 70_001)
    assert meta["tokenizer_sha256"] == file_sha256(tok_path)
    train = open_split(out, "train")
    assert train.dtype == np.uint32 and train[0] == 70_000 and train.max() == 70_001
    # byte-level with no merges: one token per byte, plus bos and eos per document
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(
        len(d.encode()) + 2 for d in docs)
    assert sorted(split_documents(out, "train") + split_documents(out, "val")) == sorted(docs)


def test_crash_leaves_no_data_directory(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / "data"

    def explode(directory, meta):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "write_meta", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare([str(root)], out, vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no data dir, no temporary left
    monkeypatch.undo()
    prepare([str(root)], out, vocab_size=300)
    meta_before = (out / "meta.json").read_text()
    monkeypatch.setattr(prepare_mod, "write_meta", explode)
    with pytest.raises(RuntimeError):
        prepare([str(root)], out, vocab_size=300, force=True)
    assert (out / "meta.json").read_text() == meta_before  # the previous directory is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]


@pytest.mark.slow
def test_builtin_corpus_builds_once_and_is_cached(tmp_path):
    from deepseekmoe.data.builtin_cache import ensure_builtin_data

    start = time.perf_counter()
    data_dir = ensure_builtin_data(tmp_path, vocab_size=1024, max_bytes=1_500_000)
    build_s = time.perf_counter() - start
    meta = read_meta(data_dir)
    assert meta["vocab_size"] == 1024 and meta["sources"] == ["builtin"] and meta["builtin"]["max_bytes"] == 1_500_000
    assert meta["splits"]["train"]["bytes"] > 1_000_000 and meta["splits"]["val"]["tokens"] > 5_000
    train_docs = split_documents(data_dir, "train")
    assert any("def " in d for d in train_docs)  # standard library sources
    mtime = (data_dir / "train.bin").stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_builtin_data(tmp_path, vocab_size=1024, max_bytes=1_500_000) == data_dir
    assert time.perf_counter() - start < min(0.5, build_s)
    assert (data_dir / "train.bin").stat().st_mtime_ns == mtime
