"""Output files the user names: checked before any work, written aside and renamed into place.

`check_output_file` runs when a command starts, so a bad `--out` is one error line before minutes of work, and
`write_text_atomically` leaves either the old file or the new one, complete, never a half-written one or a stray
temporary file. Both raise ValueError (a user error: one line, exit code 2).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 16 << 20


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """`path` can be written as a file: not a directory, and its nearest existing parent is a writable directory."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    _check_parent(path, what)
    return path


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """`path` is a directory or can be made one: nothing that is not a directory stands in the way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a directory")
    _check_parent(path, what)
    return path


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_parent(path: Path, what: str) -> None:
    parent = _nearest_existing(path.absolute().parent)
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {parent} is not writable")


def as_disk_full(exc: BaseException, target: Path) -> OSError | None:
    """An ENOSPC OSError naming `target` when `exc` came from running out of space while writing it, else None.

    torch.save's zip writer reports a full disk as a RuntimeError ("iostream error", "unexpected pos"); it is read
    as one when the file system of `target` has (almost) no space left at the moment of the failure."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return OSError(exc.errno, os.strerror(exc.errno), str(target))
    if isinstance(exc, RuntimeError):
        if shutil.disk_usage(_nearest_existing(target)).free < NEARLY_FULL_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    return None


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write `text` to a temporary sibling, flush it to disk, then rename it over `path` (removed on any error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes the file private; the result is an ordinary output file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
