"""Setting up a run directory: resolve the configuration, bind it to the data, refuse to clobber a previous run.

RUN_DIR/
    config.yaml       the exact resolved RunConfig (rewritten on --resume when train.* overrides change it)
    metrics.jsonl     one JSON object per log step / validation (see metrics.py)
    tensorboard/      when the tensorboard package is installed
    checkpoints/step_XXXXXXXX/   the newest train.keep_last checkpoints (see state.py)
    train.lock        held (flock) by the trainer working in the directory; a second one is refused

The default RUN_DIR is runs/<preset> (relative to the working directory). Starting into a non-empty RUN_DIR
without --resume is an error, so a finished run is never overwritten by accident.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..data.builtin_cache import ensure_builtin_data
from ..errors import UserError, UserValueError
from ..fileio import write_text_atomically
from ..filenames import RUN_CONFIG_FILE
from .config import RunConfig, load_config

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR/train.lock for the duration: a second trainer in the same directory (which would interleave
    checkpoints and metrics) is refused with one line. The operating system lets the lock go when the holder
    exits, however it ends, so a killed run never leaves a stale lock. Not on Windows (no flock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"run directory {run_dir} is in use by another trainer ({holder}); wait for it or "
                           "use another --out") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield


def split_config_args(args: list[str] | tuple[str, ...]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] key=value ... -> (config path or None, overrides)."""
    args = list(args)
    path = args.pop(0) if args and "=" not in args[0] else None
    stray = [a for a in args if "=" not in a]
    if stray:
        raise UserError(f"unexpected argument {stray[0]!r}: give at most one CONFIG file, first, then key=value "
                       "overrides")
    return path, args


def option_values(preset: str | None, data: str | None, out: str | None, max_steps: int | None,
                  fsdp: bool | None = None) -> dict[str, Any]:
    """The command-line options given, as load_config's typed options (applied before the key=value ones)."""
    given = {"preset": preset, "data": data, "out": out, "train.max_steps": max_steps, "train.fsdp": fsdp}
    return {key: value for key, value in given.items() if value is not None}


def resolve_run(path: str | None, overrides: list[str], resume: bool,
                options: Mapping[str, Any] | None = None) -> tuple[RunConfig, Path]:
    """The run's config and directory; on --resume the run's own config.yaml is the base layer."""
    run = load_config(path, overrides, options=options)
    run_dir = run.run_dir
    if resume:
        saved = run_dir / RUN_CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {run_dir} holds no run to resume (no {RUN_CONFIG_FILE})")
        run = load_config(path, overrides, base=saved, options=options)
        if run.run_dir != run_dir:  # the directory was found by its new name: record that one
            run = dataclasses.replace(run, out=str(run_dir))
    elif run_dir.exists() and (not run_dir.is_dir() or not _holds_only_leftovers(run_dir)):
        raise UserError(f"run directory {run_dir} is not empty: pass --resume to continue that run, or --out DIR "
                       "for a new one")
    return run, run_dir


def data_directory(run: RunConfig) -> Path:
    """The run's prepared data directory; the built-in corpus (built on first use) when none is given."""
    if run.data:
        return Path(run.data)

    return Path(ensure_builtin_data())


def bind_to_data(run: RunConfig, meta: dict) -> RunConfig:
    """The model's vocabulary and bos/eos ids come from the data (meta.json), whatever the preset says."""
    model = run.model.replace(vocab_size=int(meta["vocab_size"]), bos_token_id=meta.get("bos_token_id"),
                              eos_token_id=meta.get("eos_token_id"))
    if run.train.seq_len > model.max_position_embeddings:
        raise UserValueError(f"train.seq_len={run.train.seq_len} exceeds model.max_position_embeddings="
                         f"{model.max_position_embeddings}")
    return dataclasses.replace(run, model=model)


def _holds_only_leftovers(run_dir: Path) -> bool:
    """Nothing but what a trainer killed before writing its config leaves (its lock, a temporary config file):
    such a directory is as good as empty for a fresh start."""
    return all(p.name == LOCK_FILE or (p.name.startswith(RUN_CONFIG_FILE + ".") and p.name.endswith(".tmp"))
               for p in run_dir.iterdir())


def write_config(run_dir: Path, run: RunConfig) -> None:
    """Write RUN_DIR/config.yaml atomically."""
    write_text_atomically(run_dir / RUN_CONFIG_FILE, run.to_yaml())
