"""The built-in corpus: text every Python installation carries, so training needs no download.

It is pydoc's topics text (pydoc_data.topics: the language reference's prose) followed by the standard library's
own .py sources (sysconfig's "stdlib" path, without site-packages, test suites, codec tables and caches), taken in
an order fixed by a hash of each file's relative path (a size cap then keeps a spread of modules, not just a..m)
until the cap is reached. On CPython 3.11 that is about 11 MB of text, ~2.8M tokens at vocabulary 8192.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..filenames import TOKENIZER_FILE
from .corpus import InputFile

BUILTIN_SOURCE = "builtin"
DEFAULT_MAX_BYTES = 16_000_000
BUILTIN_VAL_FRACTION = 0.02  # ~50k validation tokens at vocabulary 8192
BUILTIN_TOKENIZER_TRAIN_BYTES = 5_000_000  # half the corpus; tokenizes to ~1% more tokens than training on all
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
                 "pydoc_data"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(root: Path) -> list[Path]:
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith(".")]
        found.extend(Path(directory) / f for f in files if f.endswith(".py"))
    return found


def builtin_inputs(max_bytes: int = DEFAULT_MAX_BYTES) -> list[InputFile]:
    """The built-in corpus's input files, in their fixed order, up to about max_bytes of file size."""
    if max_bytes <= 0:
        raise ValueError(f"the built-in corpus size cap must be positive, got {max_bytes} bytes")
    inputs: list[InputFile] = []
    total = 0
    try:
        import pydoc_data.topics as topics

        inputs.append(InputFile(Path(topics.__file__), "pydoc-topics"))
        total += Path(topics.__file__).stat().st_size
    except ImportError:  # some distributions strip pydoc_data; the sources alone still make a corpus
        pass
    root = stdlib_dir()
    files = sorted(_stdlib_sources(root),
                   key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).digest())
    for path in files:
        if total >= max_bytes:
            break
        inputs.append(InputFile(path, "text"))
        total += path.stat().st_size
    if len(inputs) < 2:
        raise FileNotFoundError(f"the built-in corpus found no Python sources under {root}")
    return inputs


def cache_root() -> Path:
    """Where built data lives: $DEEPSEEKMOE_CACHE, else ~/.cache/deepseekmoe."""
    env = os.environ.get("DEEPSEEKMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepseekmoe"


def builtin_identity(vocab_size: int, max_bytes: int) -> dict:
    """What the cached built-in data depends on (besides the stdlib files themselves)."""
    return {"python": sys.version, "stdlib": str(stdlib_dir()), "vocab_size": vocab_size, "max_bytes": max_bytes}


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
    from .dataset import read_meta

    try:
        meta = read_meta(data_dir)
    except (FileNotFoundError, ValueError):
        return False
    return meta.get("builtin") == identity and all((data_dir / f).is_file()
                                                   for f in (TOKENIZER_FILE, "train.bin", "val.bin"))


def ensure_builtin_data(root: str | Path | None = None, vocab_size: int = 8192,
                        max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """The prepared data directory of the built-in corpus, built on first use (well under a minute) and cached.

    The cache entry is ROOT/builtin-v{vocab_size}; it is rebuilt when the Python installation or the options
    change. Later calls only read its meta.json.
    """
    from .prepare import prepare

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
