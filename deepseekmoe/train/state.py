"""Training checkpoints: a model checkpoint (see checkpoint.py) plus everything needed to continue exactly.

RUN_DIR/checkpoints/step_XXXXXXXX/
    model.safetensors, config.json, tokenizer.json   the model, loadable by checkpoint.load_checkpoint
    trainer_state.pt    optimizer and LR-scheduler state dicts, RNG states (torch CPU/CUDA, Python), the data
                        position (next batch index), the step and the non-finite-loss counters
    run_config.yaml     the resolved RunConfig the run was using
or, written by a fully sharded run (`train --fsdp`), a sharded checkpoint (sharded_checkpoint.py) whose
extra_state.pt holds the scheduler, RNG and progress, and whose dcp/ holds the weights and the AdamW state.

Each checkpoint is written aside and renamed into place (fileio.written_atomically), so a crash while
saving leaves the previous checkpoints untouched; afterwards only the newest `keep_last` are kept.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import is_sharded, list_checkpoints, write_model_files
from ..distributed.mesh import Parallel
from ..fileio import written_atomically
from ..filenames import CHECKPOINT_RUN_CONFIG_FILE, STEP_PREFIX, TRAINER_STATE_FILE
from .sharded_checkpoint import read_extra, save_sharded


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    """Optimizer steps taken so far (skipped non-finite steps included: they consume data and a schedule slot)."""
    data_index: int = 0
    """Index of the next training micro-batch (PackedBatches.batch(index))."""
    nonfinite_total: int = 0
    """Steps skipped because the loss or gradient norm was not finite."""
    nonfinite_in_row: int = 0
    """Consecutive skipped steps ending at `step`."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_state(scheduler: Any, progress: Progress) -> dict[str, Any]:
    return {"scheduler": scheduler.state_dict(), "rng": rng_state(), "progress": asdict(progress)}


def save_training_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer_state: dict[str, Any],
                             scheduler: Any, progress: Progress, run_config_yaml: str,
                             tokenizer_path: Path | None, keep_last: int) -> Path:
    """Atomically write checkpoints/step_<step>/ and delete all but the newest `keep_last` checkpoints."""
    final = checkpoint_dir(run_dir, progress.step)
    with written_atomically(final) as tmp:
        write_model_files(model, tmp, tokenizer_path)
        torch.save({"optimizer": optimizer_state, **_resume_state(scheduler, progress)}, tmp / TRAINER_STATE_FILE)
        (tmp / CHECKPOINT_RUN_CONFIG_FILE).write_text(run_config_yaml)
    prune_checkpoints(run_dir, keep_last)
    return final


def save_sharded_training_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                     scheduler: Any, progress: Progress, run_config_yaml: str,
                                     tokenizer_path: Path | None, keep_last: int, parallel: Parallel) -> Path:
    """`save_training_checkpoint` as a sharded checkpoint: every rank writes its shards; rank 0 the rest and the
    pruning. Collective."""
    final = save_sharded(checkpoint_dir(run_dir, progress.step), model, optimizer, parallel,
                         _resume_state(scheduler, progress), tokenizer_path, run_config_yaml)
    if parallel.is_main:
        prune_checkpoints(run_dir, keep_last)
    return final


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """What resumes a run besides the weights: {"optimizer" (single-file checkpoints only; a sharded one's is in
    its dcp/), "scheduler", "rng", "progress": Progress}."""
    path = ckpt / TRAINER_STATE_FILE
    if is_sharded(ckpt):
        state = read_extra(ckpt)
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = {}
    if "progress" not in state:
        held = "scheduler, RNG and progress" if is_sharded(ckpt) else TRAINER_STATE_FILE
        raise FileNotFoundError(f"{ckpt} has no {held}: it is a model-only checkpoint, which cannot be resumed")
    state["progress"] = Progress(**state["progress"])
    return state


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and any leftovers of interrupted saves."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep_last] if keep_last > 0 else ckpts
    root = run_dir / "checkpoints"
    if root.is_dir():
        doomed += [p for p in root.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
