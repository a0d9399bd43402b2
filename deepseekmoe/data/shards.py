"""Tokenizing documents in parallel and appending them to the split token files (train.bin, val.bin).

Documents are encoded in chunks of about CHUNK_CHARS characters with `Tokenizer.encode_batch(_fast)`, which spreads a
chunk's documents over all cores (Rust threads; RAYON_NUM_THREADS limits them). Each document is written as
bos + tokens + eos, in corpus order, to the file of its split.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from ..errors import UserValueError
from ..filenames import TOKEN_FILES

CHUNK_CHARS = 2_000_000


@dataclass
class SplitCounts:
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def progress_bar(total: int | None, desc: str) -> tqdm:
    """A byte-counting progress bar on stderr (total None: unknown), shown only on a terminal; callers print plain
    stage lines, which is all a log file gets."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)


def append_tokens(handle: BinaryIO, ids: list[int], bos: int, eos: int, dtype: np.dtype) -> int:
    """Write bos + ids + eos to an open split file; returns the number of tokens written."""
    row = np.empty(len(ids) + 2, dtype=dtype)
    row[0], row[-1] = bos, eos
    row[1:-1] = ids
    handle.write(row.tobytes())
    return len(row)


def write_splits(documents: Iterable[str], is_val: list[bool], tok: Tokenizer, out_dir: Path, *, bos: int,
                 eos: int, dtype: np.dtype, total_bytes: int) -> dict[str, SplitCounts]:
    """Encode every document and append it to out_dir/train.bin or out_dir/val.bin -> counts per split."""
    counts = {"train": SplitCounts(), "val": SplitCounts()}
    index = 0
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets: about a third less CPU
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    with open(out_dir / TOKEN_FILES["train"], "wb") as train_f, open(out_dir / TOKEN_FILES["val"], "wb") as val_f, \
            progress_bar(total_bytes, "tokenizing") as bar:
        for chunk in _chunks(documents):
            encodings = encode(chunk, add_special_tokens=False)
            for doc, enc in zip(chunk, encodings):
                if index >= len(is_val):
                    raise _changed(len(is_val))
                split = "val" if is_val[index] else "train"
                handle = val_f if split == "val" else train_f
                nbytes = len(doc.encode("utf-8"))
                c = counts[split]
                c.tokens += append_tokens(handle, enc.ids, bos, eos, dtype)
                c.bytes += nbytes
                c.documents += 1
                bar.update(nbytes)
                index += 1
    if index != len(is_val):
        raise _changed(len(is_val))
    return counts


def _changed(expected: int) -> UserValueError:
    return UserValueError(f"the input files changed while they were read (expected {expected} documents); run again")
