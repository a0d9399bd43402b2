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
from pathlib import Path

from ..errors import UserValueError
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
        raise UserValueError(f"the built-in corpus size cap must be positive, got {max_bytes} bytes")
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


def builtin_identity(vocab_size: int, max_bytes: int) -> dict:
    """What the cached built-in data depends on (besides the stdlib files themselves)."""
    return {"python": sys.version, "stdlib": str(stdlib_dir()), "vocab_size": vocab_size, "max_bytes": max_bytes}
