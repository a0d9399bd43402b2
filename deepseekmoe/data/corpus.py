"""Reading a text corpus: expanding sources into input files, and input files into documents.

A source is a file, a directory (searched recursively), a glob pattern, or `hf:NAME[:SPLIT]` (a hub dataset in the
local HF datasets cache). Files found in directories or by globs are kept when their name ends in one of
TEXT_SUFFIXES / JSONL_SUFFIXES (optionally followed by .gz) or TABLE_SUFFIXES; a file named explicitly is always
read: as JSON lines when it ends in .jsonl(.gz), as a table through HF `datasets` when it ends in .parquet, .arrow
or .json(.gz) (tables.py), else as text.

A document is one JSON-lines record or table row (its text field, "text" unless told otherwise) or one piece of a
text file: text files are cut at line boundaries (a blank line when there is one) into pieces of at most PIECE_CHARS
characters, so a single large file still gives enough documents for a train/validation split and for parallel
tokenization.

Bytes that are not valid UTF-8 are replaced by U+FFFD and counted; a file read as text that holds NUL bytes, or in
which more than BINARY_REPLACED_FRACTION of the characters are invalid, is refused as binary.
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

from ..errors import UserValueError
from .tables import hub_documents, hub_identity, table_documents

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl",)
TABLE_SUFFIXES = (".parquet", ".arrow")
BINARY_REPLACED_FRACTION = 0.1
_MAGIC = {b"PAR1": "a Parquet file (name it .parquet)", b"ARROW1": "an Arrow file (name it .arrow)",
          b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
          b"%PDF": "a PDF document", b"PK\x03\x04": "a zip archive", b"\x7fELF": "an executable"}
PIECE_CHARS = 64 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")

InputKind = Literal["text", "jsonl", "parquet", "arrow", "json", "hf", "pydoc-topics"]


@dataclass(frozen=True)
class InputFile:
    """One file to read; `kind` says how. ("pydoc-topics" is the built-in corpus's pydoc_data.topics module; "hf" a
    cached hub dataset, whose `path` is its `hf:NAME[:SPLIT]` source.)"""

    path: Path
    kind: InputKind
    text_field: str = "text"
    """The field of a JSON record or table row that holds the document."""

    def stat_key(self) -> list:
        """What identifies this input's content for the no-op check: path, size and modification time (a hub
        dataset's datasets fingerprint), and the text field."""
        if self.kind == "hf":
            return [str(self.path), self.kind, self.text_field, hub_identity(str(self.path))]
        st = self.path.stat()
        return [str(self.path.resolve()), self.kind, st.st_size, st.st_mtime_ns, self.text_field]


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
    name = path.name.lower()
    base = _strip_gz(name)
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TABLE_SUFFIXES):
        return name.rsplit(".", 1)[1]  # type: ignore[return-value]
    if base.endswith(".json") and explicit:
        return "json"
    if base.endswith(TEXT_SUFFIXES) or explicit:
        return "text"
    return None


def _walk(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return found


def expand_source(source: str, text_field: str = "text") -> list[InputFile]:
    """The input files one source names, in a deterministic order. FileNotFoundError when it names nothing."""
    if source.startswith("hf:"):
        return [InputFile(Path(source), "hf", text_field)]
    path = Path(source).expanduser()
    if path.is_file():
        return [InputFile(path, file_kind(path, explicit=True), text_field)]  # type: ignore[arg-type]
    if path.is_dir():
        candidates = _walk(path)
    elif glob.has_magic(source):
        candidates = []
        for match in sorted(glob.glob(os.path.expanduser(source), recursive=True)):
            m = Path(match)
            candidates.extend(_walk(m) if m.is_dir() else [m])
    else:
        raise FileNotFoundError(f"no such file or directory: {source}")
    inputs = [InputFile(p, kind, text_field) for p in candidates if p.is_file()
              and (kind := file_kind(p, explicit=False)) is not None]
    if not inputs:
        wanted = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES)
        raise FileNotFoundError(f"{source} matches no readable files (looked for {wanted}, optionally .gz)")
    return inputs


def expand_sources(sources: list[str], text_field: str = "text") -> list[InputFile]:
    """All input files of several sources, each file once (first mention wins)."""
    if not sources:
        raise UserValueError("no sources given: name files, directories, globs, hf:NAME or `builtin`")
    seen: set[Path | str] = set()
    inputs = []
    for source in sources:
        for inp in expand_source(source, text_field):
            key = str(inp.path) if inp.kind == "hf" else inp.path.resolve()
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


def binary_reason(raw: bytes, text: str, replaced: int) -> str | None:
    """Why these bytes are not text (a known binary format, NUL bytes, mostly invalid UTF-8), or None."""
    kind = next((what for magic, what in _MAGIC.items() if raw.startswith(magic)), None)
    if kind is not None:
        return kind
    if b"\x00" in raw:
        return "it holds NUL bytes"
    if replaced > BINARY_REPLACED_FRACTION * max(1, len(text)):
        return f"{replaced} of its {len(text)} characters are invalid UTF-8"
    return None


def _text_documents(inp: InputFile, stats: ReadStats) -> Iterator[str]:
    with _open_binary(inp.path) as f:
        raw = f.read()
    text, bad = decode_utf8(raw)
    reason = binary_reason(raw, text, bad)
    if reason is not None:
        raise UserValueError(f"{inp.path} is not text ({reason}); prepare reads text files, .jsonl, .json, .parquet "
                         "and .arrow")
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
                raise UserValueError(f"{inp.path}:{lineno}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise UserValueError(f"{inp.path}:{lineno}: JSON nested too deeply to read") from None
            text = record.get(inp.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserValueError(f"{inp.path}:{lineno}: expected an object with a string field "
                                 f"\"{inp.text_field}\"" + _fields_hint(record))
            text, bad = _replace_surrogates(text)
            bad_total += bad
            if text.strip():
                yield text
    if bad_total:
        stats.replaced[str(inp.path)] = bad_total


def _fields_hint(record: object) -> str:
    if not isinstance(record, dict):
        return ""
    return " (its fields: " + (", ".join(map(str, record)) or "none") + "; choose one with --text-field)"


def _pydoc_topic_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def read_documents(inp: InputFile, stats: ReadStats) -> Iterator[str]:
    """The documents of one input file. ValueError (one line) when it cannot be read or parsed."""
    if inp.kind == "pydoc-topics":
        yield from _pydoc_topic_documents()
        return
    if inp.kind == "hf":
        yield from hub_documents(str(inp.path), inp.text_field)
        return
    try:
        if inp.kind in ("parquet", "arrow", "json"):
            yield from table_documents(inp.path, inp.kind, inp.text_field)
            return
        reader = _jsonl_documents if inp.kind == "jsonl" else _text_documents
        yield from reader(inp, stats)
    except (OSError, EOFError, zlib.error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or type(exc).__name__)
        raise UserValueError(f"cannot read {inp.path}: {reason}") from None


def iter_documents(inputs: list[InputFile], stats: ReadStats) -> Iterator[str]:
    """All documents of all inputs, in order."""
    for inp in inputs:
        yield from read_documents(inp, stats)


def document_key(text: str) -> int:
    """A 64-bit hash of a document's content (orders documents for the train/validation split)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
