"""`deepseekmoe prepare`: text sources -> a data directory (tokenizer.json, train.bin, val.bin, meta.json).

Steps: expand the sources into input files; read every document once to hash and measure it; choose the validation
documents; train the tokenizer on a sample of the training documents (or reuse a given one); read again, tokenizing
in parallel, into the split files. Everything is written into a temporary sibling directory that is renamed into
place at the end, so an interrupted run leaves no half-written data directory. The input fingerprint (paths, sizes,
modification times, options) is kept in meta.json: re-running with unchanged input and options does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import UserValueError
from ..fileio import written_atomically
from ..filenames import META_FILE, TOKEN_FILES, TOKENIZER_FILE
from ..version import __version__
from .builtin import BUILTIN_SOURCE, DEFAULT_MAX_BYTES, builtin_identity, builtin_inputs
from .corpus import InputFile, ReadStats, document_key, expand_sources, iter_documents
from .dataset import FORMAT, read_meta
from .shards import progress_bar, write_splits
from .tokenizer import (MIN_VOCAB_SIZE, file_sha256, load_tokenizer, special_token_ids, token_dtype, train_tokenizer,
                        vocab_size_of)

DEFAULT_TOKENIZER_TRAIN_BYTES = 16_000_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_inputs(sources: list[str], builtin_max_bytes: int, text_field: str = "text") -> list[InputFile]:
    """Input files of all sources; the source name `builtin` stands for the built-in corpus."""
    files = [s for s in sources if s != BUILTIN_SOURCE]
    inputs = builtin_inputs(builtin_max_bytes) if BUILTIN_SOURCE in sources else []
    if files or not inputs:
        inputs += expand_sources(files, text_field)
    return inputs


def scan(inputs: list[InputFile], stats: ReadStats) -> tuple[list[int], list[int]]:
    """Read every document once -> (content hash keys, UTF-8 sizes), one entry per document."""
    keys, sizes = [], []
    with progress_bar(None, "reading") as bar:
        for doc in iter_documents(inputs, stats):
            nbytes = len(doc.encode("utf-8"))
            keys.append(document_key(doc))
            sizes.append(nbytes)
            bar.update(nbytes)
    return keys, sizes


def choose_validation(keys: list[int], sizes: list[int], val_fraction: float) -> list[bool]:
    """Document-level split: take documents in content-hash order until they hold val_fraction of the bytes.

    Documents larger than twice the target are passed over while smaller ones can reach it, so one huge document
    does not swallow the split. At least one document goes to each side; identical documents share a side.
    """
    n = len(keys)
    if n < 2:
        raise UserValueError(f"the corpus is too small for a train/validation split: {n} document, need at least 2 "
                         "(add text, or more files)")
    target = val_fraction * sum(sizes)
    order = sorted(range(n), key=lambda i: (keys[i], i))
    for limit in (2 * target, float("inf")):
        chosen, got = [], 0
        for i in order:
            if got >= target:
                break
            if sizes[i] <= limit:
                chosen.append(i)
                got += sizes[i]
        if got >= target:
            break
    if len(chosen) == n:  # keep at least one training document (and its duplicates off the val side)
        chosen = [i for i in chosen if keys[i] != keys[chosen[-1]]] or chosen[:-1]
    is_val = [False] * n
    for i in chosen:
        is_val[i] = True
    return is_val


def tokenizer_sample(inputs: list[InputFile], keys: list[int], sizes: list[int], is_val: list[bool],
                     budget: int) -> list[str]:
    """Training documents, in content-hash order, up to `budget` bytes (at least one document)."""
    picked: set[int] = set()
    total = 0
    for i in sorted(range(len(keys)), key=lambda i: (keys[i], i)):
        if not is_val[i] and (total < budget or not picked):
            picked.add(i)
            total += sizes[i]
    return [doc for i, doc in enumerate(iter_documents(inputs, ReadStats())) if i in picked]


def fingerprint(inputs: list[InputFile], options: dict) -> str:
    """A hash of everything the output depends on: each input's path, size, mtime, and the options."""
    state = {"format": FORMAT, "inputs": [inp.stat_key() for inp in inputs], "options": options}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def is_up_to_date(out: Path, input_fingerprint: str) -> bool:
    try:
        meta = read_meta(out)
    except (FileNotFoundError, ValueError):
        return False
    files_present = all((out / f).is_file() for f in (TOKENIZER_FILE, *TOKEN_FILES.values()))
    return files_present and meta.get("input_fingerprint") == input_fingerprint


DATA_FILES = frozenset({META_FILE, TOKENIZER_FILE, *TOKEN_FILES.values()})
"""Everything prepare writes into a data directory: the final rename replaces `out` as a whole, so a directory
holding anything else is never replaced."""


def check_replaceable(out: Path) -> None:
    """Refuse to replace anything but a data directory holding only what prepare writes."""
    if out.exists() and not out.is_dir():
        raise UserValueError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / META_FILE).is_file():
        raise UserValueError(f"--out {out} exists and is not a data directory (no {META_FILE}); "
                         "choose a new or empty directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in DATA_FILES)
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserValueError(f"--out {out} also holds files prepare did not write ({listed}); move them or choose "
                         "another directory (prepare replaces the directory as a whole)")


def check_inputs_outside(out: Path, inputs: list[InputFile]) -> None:
    """Refuse an output directory that contains an input (replacing it would delete the corpus)."""
    target = out.resolve()
    inside = next((f.path for f in inputs if f.kind != "hf" and target in f.path.resolve().parents), None)
    if inside is not None:
        raise UserValueError(f"--out {out} contains the input {inside}; choose a directory outside the sources")


def write_meta(directory: Path, meta: dict) -> None:
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _report_replacements(stats: ReadStats) -> None:
    if stats.replaced_total:
        worst = sorted(stats.replaced.items(), key=lambda kv: -kv[1])[:3]
        where = ", ".join(f"{Path(p).name}: {n}" for p, n in worst)
        more = ", ..." if len(stats.replaced) > 3 else ""
        log(f"replaced {stats.replaced_total} invalid UTF-8 sequence(s) with U+FFFD in "
            f"{len(stats.replaced)} file(s) ({where}{more})")


def _make_tokenizer(tokenizer: str | None, vocab_size: int, sample: list[str] | None, tmp: Path):
    """Train (or load and copy) the tokenizer into tmp/tokenizer.json -> the Tokenizer."""
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        source = Path(tokenizer) / TOKENIZER_FILE if Path(tokenizer).is_dir() else Path(tokenizer)
        shutil.copyfile(source, tmp / TOKENIZER_FILE)
        return tok
    assert sample is not None
    start = time.perf_counter()
    nbytes = sum(len(d.encode("utf-8")) for d in sample)
    log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {nbytes / 1e6:.1f} MB ...")
    tok = train_tokenizer(sample, vocab_size)
    log(f"trained the tokenizer in {time.perf_counter() - start:.1f} s: {vocab_size_of(tok)} tokens")
    tok.save(str(tmp / TOKENIZER_FILE))
    return tok


def _check_arguments(out: Path, tokenizer: str | None, vocab_size: int, val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise UserValueError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    check_replaceable(out)
    if tokenizer is not None:
        load_tokenizer(tokenizer)  # fail early on a bad path or file
    elif vocab_size < MIN_VOCAB_SIZE:
        raise UserValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE}")


def _write_data(tmp: Path, inputs: list[InputFile], keys: list[int], sizes: list[int], is_val: list[bool], *,
                tokenizer: str | None, vocab_size: int, tokenizer_train_bytes: int) -> dict:
    """Write tokenizer.json, train.bin and val.bin into tmp -> the tokenizer and split part of meta.json."""
    sample = None if tokenizer else tokenizer_sample(inputs, keys, sizes, is_val, tokenizer_train_bytes)
    tok = _make_tokenizer(tokenizer, vocab_size, sample, tmp)
    special = special_token_ids(tok)
    vocab = vocab_size_of(tok)
    dtype = token_dtype(vocab)
    start = time.perf_counter()
    counts = write_splits(iter_documents(inputs, ReadStats()), is_val, tok, tmp, bos=special["bos_token_id"],
                          eos=special["eos_token_id"], dtype=dtype, total_bytes=sum(sizes))
    log(f"tokenized in {time.perf_counter() - start:.1f} s")
    return {"format": FORMAT, "vocab_size": vocab, "dtype": dtype.name, **special,
            "tokenizer_sha256": file_sha256(tmp / TOKENIZER_FILE),
            "tokenizer_source": str(Path(tokenizer).resolve()) if tokenizer else "trained",
            "splits": {name: c.as_dict() for name, c in counts.items()}}


def prepare(sources: list[str], out: str | Path, *, vocab_size: int = 8192, tokenizer: str | None = None,
            val_fraction: float = 0.01, builtin_max_bytes: int = DEFAULT_MAX_BYTES,
            tokenizer_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES, force: bool = False,
            text_field: str = "text") -> Path:
    """Build (or confirm up to date) the data directory `out` from `sources`; returns its path."""
    out = Path(out).expanduser()
    _check_arguments(out, tokenizer, vocab_size, val_fraction)
    inputs = resolve_inputs(sources, builtin_max_bytes, text_field)
    check_inputs_outside(out, inputs)
    options = {"vocab_size": None if tokenizer else vocab_size, "val_fraction": val_fraction,
               "tokenizer_sha256": file_sha256(_tokenizer_file(tokenizer)) if tokenizer else None,
               "tokenizer_train_bytes": None if tokenizer else tokenizer_train_bytes,
               "builtin": builtin_identity(vocab_size, builtin_max_bytes) if BUILTIN_SOURCE in sources else None}
    input_fingerprint = fingerprint(inputs, options)
    if not force and is_up_to_date(out, input_fingerprint):
        log(f"{out} is up to date ({len(inputs)} input files unchanged); nothing to do")
        return out

    stats = ReadStats()
    keys, sizes = scan(inputs, stats)
    if not keys:
        raise UserValueError(f"no text found in {' '.join(sources)} (every input file is empty)")
    is_val = choose_validation(keys, sizes, val_fraction)
    log(f"read {len(inputs)} files: {len(keys)} documents, {sum(sizes) / 1e6:.2f} MB of text")
    _report_replacements(stats)

    with written_atomically(out) as tmp:
        _make_shareable(tmp)
        meta = _write_data(tmp, inputs, keys, sizes, is_val, tokenizer=tokenizer, vocab_size=vocab_size,
                           tokenizer_train_bytes=tokenizer_train_bytes)
        meta.update({"sources": list(sources), "files": len(inputs), "val_fraction": val_fraction,
                     "invalid_utf8_replaced": stats.replaced_total, "input_fingerprint": input_fingerprint,
                     "created_by": f"deepseekmoe {__version__}"})
        if options["builtin"]:
            meta["builtin"] = options["builtin"]
        write_meta(tmp, meta)
    return out


def _make_shareable(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the data directory the usual permissions instead."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)


def _tokenizer_file(tokenizer: str) -> Path:
    p = Path(tokenizer)
    return p / TOKENIZER_FILE if p.is_dir() else p
