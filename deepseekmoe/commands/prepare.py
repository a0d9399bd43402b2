"""`deepseekmoe prepare`: text files -> a training data directory (tokenizer, token files, meta.json)."""

from __future__ import annotations

import os

from ..data.dataset import read_meta
from ..data.prepare import prepare
from ..errors import UserValueError


def prepare_command(sources: list[str], *, out: str, vocab_size: int = 8192, tokenizer: str | None = None,
                    val_fraction: float = 0.01, workers: int | None = None, builtin_max_mb: float = 16.0,
                    tokenizer_train_mb: float = 16.0, text_field: str = "text", force: bool = False) -> int:
    """Turn text into a training data directory: a byte-level BPE tokenizer, token files and meta.json.

    SOURCES are files, directories (searched recursively) and glob patterns ("data/**/*.txt", quoted); directories
    and globs contribute .txt .md .rst .py files and .jsonl files (one JSON object per line with a "text" field),
    each optionally gzip-compressed (.gz), and .parquet and .arrow tables; a .json(.gz) file (JSON lines or an
    array of objects) is read when named. Tables are read through HF `datasets` (pip install
    'deepseekmoe[data]'), as is `hf:NAME[:SPLIT]`, a hub dataset already in the local datasets cache (offline,
    split train by default). The source name `builtin` selects the built-in corpus: Python's own standard library
    sources and pydoc topics, no download needed. Files are cut at blank lines into documents of at most 64 KiB; a
    jsonl record or table row is one document. Documents are split into train and validation by a hash of their
    content (deterministic, whole documents). Invalid UTF-8 is replaced and counted; a binary file (NUL bytes,
    mostly invalid UTF-8, an image, a table not named as one) is refused. Running again on unchanged input with
    the same options does nothing.

    Example: deepseekmoe prepare books/ notes.md "web/*.jsonl.gz" pages.parquet --out data/mine

    Args:
        sources: files, directories, globs, or `builtin`.
        out: the data directory to write (created, or replaced if it is an older data directory).
        vocab_size: size of the BPE vocabulary to train, special tokens included (default 8192,
            at least 260).
        tokenizer: reuse this tokenizer.json (or a directory holding one, e.g. the DeepSeekMoE-16B checkpoint)
            instead of training one; bos/eos are found by name (<|bos|>/<|eos|>, DeepSeek's
            <｜begin▁of▁sentence｜>/<｜end▁of▁sentence｜>, <s>/</s>).
        val_fraction: share of the text (by bytes) held out for validation (default 0.01); at least
            one document.
        workers: tokenizer threads (default: all cores).
        builtin_max_mb: size cap of the built-in corpus, in MB of source files (default 16: all of it on
            CPython 3.11, about 10 MB).
        tokenizer_train_mb: train the tokenizer on at most this many MB of the training documents
            (default 16).
        text_field: the field of jsonl records and table rows that holds the text (default text).
        force: rebuild even when the data directory is up to date.
    """
    if workers is not None:
        if workers < 1:
            raise UserValueError(f"--workers {workers} must be at least 1")
        os.environ["RAYON_NUM_THREADS"] = str(workers)  # read when the tokenizers thread pool starts
    data_dir = prepare(sources, out, vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction,
                       builtin_max_bytes=int(builtin_max_mb * 1e6),
                       tokenizer_train_bytes=int(tokenizer_train_mb * 1e6), force=force, text_field=text_field)
    meta = read_meta(data_dir)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"{data_dir}: vocab {meta['vocab_size']} ({meta['dtype']}), train {train['tokens']:,} tokens in "
          f"{train['documents']} documents, val {val['tokens']:,} tokens in {val['documents']} documents")
    return 0
