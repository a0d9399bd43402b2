"""Reading a text corpus: expanding sources into input files, and input files into documents.

A source is a file, a directory (searched recursively), or a glob pattern. Files found in directories or by globs are
kept when their name ends in one of TEXT_SUFFIXES / JSONL_SUFFIXES (optionally followed by .gz); a file named
explicitly is always read (as JSON lines when it ends in .jsonl or .jsonl.gz, else as text).

A document is one JSON-lines record (its "text" field) or one piece of a text file: text files are cut at line
boundaries (a blank line when there is one) into pieces of at most PIECE_CHARS characters, so a single large file
still gives enough documents for a train/validation split and for parallel tokenization.

Bytes that are not valid UTF-8 are replaced by U+FFFD and counted, never fatal.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl",)
PIECE_CHARS = 64 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")

InputKind = Literal["text", "jsonl", "pydoc-topics"]


@dataclass(frozen=True)
class InputFile:
    """One file to read; `kind` says how. ("pydoc-topics" is the built-in corpus's pydoc_data.topics module.)"""

    path: Path
    kind: InputKind

    def stat_key(self) -> list:
        """What identifies this input's content for the no-op check: path, size and modification time."""
        st = self.path.stat()
        return [str(self.path.resolve()), self.kind, st.st_size, st.st_mtime_ns]


@dataclass
class ReadStats:
    """Counts gathered while reading: replaced invalid UTF-8 sequences per file."""

    replaced: dict[str, int] = field(default_factory=dict)

    @property
    def replaced_total(self) -> int:
        return sum(self.replaced.values())


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def file_kind(path: Path, explicit: bool) -> InputKind | None:
    """How to read `path`, or None when a directory/glob match should be skipped."""
    base = _strip_gz(path.name.lower())
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(TEXT_SUFFIXES) or explicit:
        return "text"
    return None


def _walk(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return found


def expand_source(source: str) -> list[InputFile]:
    """The input files one source names, in a deterministic order. FileNotFoundError when it names nothing."""
    path = Path(source).expanduser()
    if path.is_file():
        return [InputFile(path, file_kind(path, explicit=True))]  # type: ignore[arg-type]
    if path.is_dir():
        candidates = _walk(path)
    elif glob.has_magic(source):
        candidates = []
        for match in sorted(glob.glob(os.path.expanduser(source), recursive=True)):
            m = Path(match)
            candidates.extend(_walk(m) if m.is_dir() else [m])
    else:
        raise FileNotFoundError(f"no such file or directory: {source}")
    inputs = [InputFile(p, kind) for p in candidates if p.is_file()
              and (kind := file_kind(p, explicit=False)) is not None]
    if not inputs:
        wanted = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES)
        raise FileNotFoundError(f"{source} matches no readable files (looked for {wanted}, optionally .gz)")
    return inputs


def expand_sources(sources: list[str]) -> list[InputFile]:
    """All input files of several sources, each file once (first mention wins)."""
    if not sources:
        raise ValueError("no sources given: name files, directories, globs or `builtin`")
    seen: set[Path] = set()
    inputs = []
    for source in sources:
        for inp in expand_source(source):
            key = inp.path.resolve()
            if key not in seen:
                seen.add(key)
                inputs.append(inp)
    return inputs


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing invalid sequences with U+FFFD -> (text, number of replacements)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # each invalid sequence became one U+FFFD; genuine U+FFFD characters were encoded as EF BF BD
        return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def _replace_surrogates(text: str) -> tuple[str, int]:
    """JSON escapes can produce lone surrogates (not encodable as UTF-8): replace and count them like bad bytes."""
    return _SURROGATE.subn("\ufffd", text)


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """Cut text into pieces of at most max_chars at line boundaries (blank lines preferred); lossless."""
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        window = text[start:start + max_chars]
        cut = window.rfind("\n\n", max_chars // 2)
        cut = cut + 2 if cut >= 0 else window.rfind("\n", max_chars // 2) + 1
        if cut <= 0:
            cut = max_chars
        pieces.append(window[:cut])
        start += cut
    pieces.append(text[start:])
    return pieces


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _text_documents(inp: InputFile, stats: ReadStats) -> Iterator[str]:
    with _open_binary(inp.path) as f:
        text, bad = decode_utf8(f.read())
    if bad:
        stats.replaced[str(inp.path)] = bad
    if text.strip():
        yield from split_text(text)


def _jsonl_documents(inp: InputFile, stats: ReadStats) -> Iterator[str]:
    bad_total = 0
    with _open_binary(inp.path) as f:
        for lineno, raw in enumerate(f, 1):
            line, bad = decode_utf8(raw)
            bad_total += bad
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{inp.path}:{lineno}: invalid JSON ({exc.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{inp.path}:{lineno}: expected an object with a string field \"text\"")
            text, bad = _replace_surrogates(text)
            bad_total += bad
            if text.strip():
                yield text
    if bad_total:
        stats.replaced[str(inp.path)] = bad_total


def _pydoc_topic_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def read_documents(inp: InputFile, stats: ReadStats) -> Iterator[str]:
    """The documents of one input file. ValueError (one line) when it cannot be read or parsed."""
    if inp.kind == "pydoc-topics":
        yield from _pydoc_topic_documents()
        return
    reader = _jsonl_documents if inp.kind == "jsonl" else _text_documents
    try:
        yield from reader(inp, stats)
    except (OSError, EOFError, zlib.error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
        raise ValueError(f"cannot read {inp.path}: {reason}") from None


def iter_documents(inputs: list[InputFile], stats: ReadStats) -> Iterator[str]:
    """All documents of all inputs, in order."""
    for inp in inputs:
        yield from read_documents(inp, stats)


def document_key(text: str) -> int:
    """A 64-bit hash of a document's content (orders documents for the train/validation split)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
