"""One training run from its settings: resolve the run, set up the processes, train, validate, report.

`run_training` is what `deepseekmoe train` does; `compare` calls it for each run of a suite. A `sample`
function (the command passes one that generates text) is called at the end when train.sample_tokens is set.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping

from ..accounting import count
from ..data.dataset import read_meta
from ..distributed.mesh import shutdown
from ..distributed.plan import ParallelPlan, resolve_plan
from ..distributed.training import NullLogger, main_first
from ..model import Transformer
from ..runtime import describe as describe_experts, parse_device
from ..runtime.cpu import mkl_strict
from .config import RunConfig, TrainConfig
from .metrics import MetricsLogger, truncate_metrics
from .rundir import (bind_to_data, data_directory, option_values, resolve_run, run_lock, split_config_args,
                     write_config)
from .trainer import Trainer

Sampler = Callable[[Transformer, Path, TrainConfig], str]


def run_training(config: list[str] | tuple[str, ...] = (), *, preset: str | None = None, data: str | None = None,
                 out: str | None = None, max_steps: int | None = None, resume: bool = False, ep: int = 1,
                 fsdp: bool | None = None, sample: Sampler | None = None,
                 train: Mapping[str, Any] | None = None) -> int:
    """Train as `deepseekmoe train` does (its arguments) -> the exit code (128 + signal when stopped).

    `train` holds typed TrainConfig values ({"seed": 1}) applied with the options, below the key=value overrides.
    """
    path, overrides = split_config_args(config)
    options = option_values(preset, data, out, max_steps, fsdp) | {f"train.{k}": v for k, v in (train or {}).items()}
    run, run_dir = resolve_run(path, overrides, resume, options)
    run, plan = resolve_plan(run, ep, parse_device(run.train.device, "train.device"))
    with main_first(plan.parallel):
        data_dir = data_directory(run)
    run = bind_to_data(run, read_meta(data_dir))  # the run config is final from here on
    trainer = Trainer(run, run_dir, data_dir, plan, resume=resume)  # checks before writing
    with run_lock(run_dir) if plan.parallel.is_main else nullcontext():
        return _train(trainer, run, run_dir, data_dir, resume, plan, sample)



def _train(trainer: Trainer, run: RunConfig, run_dir: Path, data_dir: Path, resume: bool,
           plan: ParallelPlan, sample: Sampler | None) -> int:
    """run_training once the run is set up and its directory locked: write, train, report."""
    main = plan.parallel.is_main
    if main:
        write_config(run_dir, run)
        if resume:
            truncate_metrics(run_dir, trainer.progress.step)
        print(f"training {run.preset or 'custom model'} ({count(run.model).total_params:,} parameters) on "
              f"{data_dir} -> {run_dir}, {trainer.device}, steps {trainer.progress.step}..{run.train.max_steps}"
              + (f", {plan.describe()}" if plan.describe() else ""), flush=True)
        print(f"routed experts: {describe_experts(trainer.model, trainer.device, trainer.compute_dtype)}", flush=True)
        if trainer.device.type == "cpu" and mkl_strict() is False and os.environ.get("MKL_CBWR") != "":
            print("warning: MKL started before deepseekmoe was imported (or with MKL_CBWR without STRICT): a resumed"
                  " run may not repeat the uninterrupted one bit for bit", file=sys.stderr, flush=True)
    logger = (MetricsLogger(run_dir, run.train.max_steps, trainer.progress.step, run.train.tensorboard)
              if main else NullLogger())
    with logger:
        stopped_by = trainer.fit(logger)
        if stopped_by is not None:
            return 128 + stopped_by  # the shell's code for a process ended by that signal
        final = trainer.validate(final=True)
        logger.log({"kind": "val", "step": trainer.progress.step, **final})
    if main:
        print(f"validation loss {final['val_loss']:.4f} nats/token, {final['val_bpb']:.4f} bits/byte "
              f"({final['val_tokens']:,} tokens); checkpoint {trainer.last_saved}")
    if run.train.sample_tokens and sample is not None:
        with plan.generation_context():  # every rank: EP and FSDP forwards are collective
            text = sample(trainer.model, trainer.tokenizer_path, run.train)
        if main:
            print("sample:", text, sep="\n")
    trainer.release()  # the process groups then go in shutdown, which frees them without the GIL
    shutdown(plan.parallel)
    return 0
