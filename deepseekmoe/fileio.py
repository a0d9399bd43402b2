"""Output files and directories: checked before any work, written aside and renamed into place.

`check_output_file` / `check_output_dir` run when a command starts, so a bad `--out` is one error line before
minutes of work (a ValueError: one line, exit code 2). `write_text_atomically` (a file) and `written_atomically`
(a directory: checkpoints, data directories, exports) write aside (name.tmp-*), flush to disk (fsync of every file
and directory) and rename into place, the parent directory flushed after: a kill or a power loss leaves the old
file or directory or the new one, complete, never a half-written or renamed-but-empty one, nor a stray temporary.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from .errors import UserValueError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 16 << 20


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """`path` can be written as a file: not a directory, and its nearest existing parent is a writable directory."""
    path = Path(path)
    if path.is_dir():
        raise UserValueError(f"{what} {path} is a directory; give a file name")
    _check_parent(path, what)
    return path


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """`path` is a directory or can be made one: nothing that is not a directory stands in the way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserValueError(f"{what} {path} exists and is not a directory")
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
        raise UserValueError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserValueError(f"{what} {path}: {parent} is not writable")


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
    _fsync(path.parent)


def atomic_directory(final: Path) -> Path:
    """A fresh temporary sibling of `final`, to fill, flush (`sync_tree`) and pass to `commit_directory`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows cannot open a directory to flush it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(directory: Path) -> None:
    """fsync every file under `directory` and the directories themselves (data on disk before any rename)."""
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def commit_directory(tmp: Path, final: Path) -> None:
    """Move a fully written, flushed (`sync_tree`) temporary directory into place, replacing any old one."""
    try:
        _commit(tmp, final)
    finally:
        _fsync(final.parent)


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextmanager
def written_atomically(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; on success it replaces `final`, on any error it is removed."""
    tmp = atomic_directory(final)
    try:
        yield tmp
        sync_tree(tmp)  # a full disk may show only here (delayed allocation)
    except BaseException as exc:
        full = as_disk_full(exc, final)  # judged before the partial files are removed and free their space
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from exc
        raise
    commit_directory(tmp, final)
