"""The built-in corpus prepared once: a data directory in the user's cache, built on first use by `prepare`."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..filenames import TOKEN_FILES, TOKENIZER_FILE
from .builtin import (BUILTIN_SOURCE, BUILTIN_TOKENIZER_TRAIN_BYTES, BUILTIN_VAL_FRACTION, DEFAULT_MAX_BYTES,
                      builtin_identity)
from .dataset import read_meta
from .prepare import prepare


def cache_root() -> Path:
    """Where built data lives: $DEEPSEEKMOE_CACHE, else ~/.cache/deepseekmoe."""
    env = os.environ.get("DEEPSEEKMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepseekmoe"


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between processes (e.g. torchrun ranks) building the same cache entry."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; concurrent first builds are then the caller's business
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_is_current(data_dir: Path, identity: dict) -> bool:
    try:
        meta = read_meta(data_dir)
    except (FileNotFoundError, ValueError):
        return False
    return meta.get("builtin") == identity and all((data_dir / f).is_file()
                                                   for f in (TOKENIZER_FILE, *TOKEN_FILES.values()))


def ensure_builtin_data(root: str | Path | None = None, vocab_size: int = 8192,
                        max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """The prepared data directory of the built-in corpus, built on first use (well under a minute) and cached.

    The cache entry is ROOT/builtin-v{vocab_size}; it is rebuilt when the Python installation or the options
    change. Later calls only read its meta.json.
    """
    root_dir = Path(root).expanduser() if root is not None else cache_root()
    suffix = "" if max_bytes == DEFAULT_MAX_BYTES else f"-{max_bytes}b"
    data_dir = root_dir / f"builtin-v{vocab_size}{suffix}"
    identity = builtin_identity(vocab_size, max_bytes)
    if _cached_is_current(data_dir, identity):
        return data_dir
    with _locked(root_dir / f".{data_dir.name}.lock"):
        if not _cached_is_current(data_dir, identity):  # another process may have built it meanwhile
            print(f"preparing the built-in corpus (Python's standard library) in {data_dir}; this happens once",
                  file=sys.stderr, flush=True)
            prepare([BUILTIN_SOURCE], data_dir, vocab_size=vocab_size, val_fraction=BUILTIN_VAL_FRACTION,
                    builtin_max_bytes=max_bytes, tokenizer_train_bytes=BUILTIN_TOKENIZER_TRAIN_BYTES)
    return data_dir
