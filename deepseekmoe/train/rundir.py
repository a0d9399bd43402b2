"""Setting up a run directory: resolve the configuration, bind it to the data, refuse to clobber a previous run.

RUN_DIR/
    config.yaml       the exact resolved RunConfig (rewritten on --resume when train.* overrides change it)
    metrics.jsonl     one JSON object per log step / validation (see metrics.py)
    tensorboard/      when the tensorboard package is installed
    checkpoints/step_XXXXXXXX/   the newest train.keep_last checkpoints (see state.py)

The default RUN_DIR is runs/<preset> (relative to the working directory). Starting into a non-empty RUN_DIR
without --resume is an error, so a finished run is never overwritten by accident.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..cli import CliError
from .config import RunConfig, load_config

CONFIG_FILE = "config.yaml"


def split_config_args(args: list[str] | tuple[str, ...]) -> tuple[str | None, list[str]]:
    """[CONFIG.yaml] key=value ... -> (config path or None, overrides)."""
    args = list(args)
    path = args.pop(0) if args and "=" not in args[0] else None
    stray = [a for a in args if "=" not in a]
    if stray:
        raise CliError(f"unexpected argument {stray[0]!r}: give at most one CONFIG file, first, then key=value "
                       "overrides")
    return path, args


def option_overrides(preset: str | None, data: str | None, out: str | None, max_steps: int | None) -> list[str]:
    """The command-line options as overrides (applied before the explicit key=value ones)."""
    items = [f"preset={preset}" if preset is not None else "", f"data={data}" if data is not None else "",
             f"out={out}" if out is not None else "",
             f"train.max_steps={max_steps}" if max_steps is not None else ""]
    return [item for item in items if item]


def resolve_run(path: str | None, overrides: list[str], resume: bool) -> tuple[RunConfig, Path]:
    """The run's config and directory; on --resume the run's own config.yaml is the base layer."""
    run = load_config(path, overrides)
    run_dir = run.run_dir
    if resume:
        saved = run_dir / CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {run_dir} holds no run to resume (no {CONFIG_FILE})")
        run = load_config(path, overrides, base=saved)
        if run.run_dir != run_dir:  # the directory was found by its new name: record that one
            run = dataclasses.replace(run, out=str(run_dir))
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise CliError(f"run directory {run_dir} is not empty: pass --resume to continue that run, or --out DIR "
                       "for a new one")
    return run, run_dir


def data_directory(run: RunConfig) -> Path:
    """The run's prepared data directory; the built-in corpus (built on first use) when none is given."""
    if run.data:
        return Path(run.data)
    from ..data.builtin import ensure_builtin_data

    return Path(ensure_builtin_data())


def bind_to_data(run: RunConfig, meta: dict) -> RunConfig:
    """The model's vocabulary and bos/eos ids come from the data (meta.json), whatever the preset says."""
    model = run.model.replace(vocab_size=int(meta["vocab_size"]), bos_token_id=meta.get("bos_token_id"),
                              eos_token_id=meta.get("eos_token_id"))
    if run.train.seq_len > model.max_position_embeddings:
        raise ValueError(f"train.seq_len={run.train.seq_len} exceeds model.max_position_embeddings="
                         f"{model.max_position_embeddings}")
    return dataclasses.replace(run, model=model)


def write_config(run_dir: Path, run: RunConfig) -> None:
    """Write RUN_DIR/config.yaml atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(run.to_yaml())
    os.replace(tmp, run_dir / CONFIG_FILE)
