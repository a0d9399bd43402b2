"""The training loop: micro-batches -> loss (LM + balance) -> AdamW step, with logging, validation, checkpoints.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences; micro-batch i of the run is
`PackedBatches(train, batch_size, seq_len, seed).batch(i)`, so the data position is one integer. Each micro-batch's
total loss is divided by grad_accum before backward, so the gradient is that of the mean loss over the step. With
equal-sized micro-batches this equals one big batch: the LM loss is a mean over equally many tokens, and the
balance losses (seq_aux=True, the default) are means of per-sequence terms. With seq_aux=False the balance
statistics are per micro-batch, which is not the same as over the whole step.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from ..accounting import estimate_mfu
from ..checkpoint import is_sharded, list_checkpoints, load_checkpoint
from ..config import ModelConfig
from ..data.dataset import PackedBatches, check_eval_windows, eval_batches, open_split
from ..data.tokenizer import load_tokenizer
from ..distributed.plan import ParallelPlan
from ..distributed.training import device_load_record
from ..errors import UserError, UserValueError
from ..eval.perplexity import score, token_byte_lengths
from ..filenames import CONFIG_FILE, TOKENIZER_FILE
from ..losses import total_loss
from ..model import Transformer
from ..runtime import for_device
from .config import RunConfig, TrainConfig
from .metrics import MetricsLogger, routing_health
from .optim import build_optimizer, build_scheduler, lr_at
from .sharded_checkpoint import load_sharded
from .state import (Progress, load_training_state, save_sharded_training_checkpoint, save_training_checkpoint,
                    set_rng_state)

CPU_PEAK_FLOPS_PER_THREAD = 100e9  # fp32 FMA peak of one modern x86 core, roughly (AVX2/AVX-512 at ~3 GHz)
GPU_PEAK_FLOPS = 989e12  # H100/H200 dense bf16


@dataclass
class StepResult:
    losses: dict[str, float]
    """Mean over micro-batches of loss (total), lm_loss, expert_balance_loss, device_balance_loss, z_loss."""
    counts_LE: torch.Tensor
    """(MoE layers, E) assignments per expert, summed over the step's micro-batches."""
    grad_norm: float
    finite: bool


_LOSS_NAMES = ("loss", "lm_loss", "expert_balance_loss", "device_balance_loss", "z_loss")


def forward_backward(model: Transformer, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                     autocast: ContextManager | None = None,
                     module: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients of the mean total loss over micro-batches (calling `module`, e.g. DDP, if given).

    Returns (the five loss means as a tensor, per-layer expert counts (L, E) summed over micro-batches).
    """
    n = len(micro_batches)
    sums = torch.zeros(len(_LOSS_NAMES), device=micro_batches[0][0].device)
    counts = None
    for inputs, targets in micro_batches:
        with autocast or nullcontext():
            out = (module or model)(inputs)
        parts = total_loss(out.logits, targets, out.router_outputs, model.config)
        (parts.total / n).backward()
        sums += torch.stack([parts.total, parts.lm, parts.expert_balance, parts.device_balance,
                             parts.z]).detach().float()
        step_counts = _stack_counts(out.router_outputs, inputs.device)
        counts = step_counts if counts is None else counts + step_counts
    return sums / n, counts


def _stack_counts(router_outputs: list, device: torch.device) -> torch.Tensor:
    if not router_outputs:
        return torch.zeros(0, 0, dtype=torch.long, device=device)
    return torch.stack([r.expert_counts_E for r in router_outputs])


def optimizer_step(model: Transformer, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig,
                   loss: torch.Tensor, clip: Callable[[float], torch.Tensor] | None = None) -> tuple[float, bool]:
    """Clip (with `clip` if given: a parallel plan's global norm), then step (only when the loss and gradient norm
    are finite); always advance the schedule.

    Returns (gradient norm before clipping, whether the update was applied).
    """
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = float(clip(max_norm) if clip else torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    finite = math.isfinite(float(loss)) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step makes LambdaLR warn about the call order
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return grad_norm, finite


@torch.no_grad()
def validation_metrics(model: Transformer, val_tokens: Any, cfg: TrainConfig, byte_lengths: np.ndarray,
                       autocast: ContextManager | None = None, max_batches: int | None = None) -> dict[str, float]:
    """LM loss and bits per byte (eval/perplexity.py) over the first `max_batches` validation batches (a fixed
    subset; None: all)."""
    was_training = model.training
    model.eval()
    r = score(model, eval_batches(val_tokens, cfg.batch_size, cfg.seq_len, max_batches), byte_lengths, autocast)
    model.train(was_training)
    return {"val_loss": r.loss, "val_bpb": r.bits_per_byte, "val_tokens": r.tokens}


class StopRequest:
    """While active, the first SIGINT (Ctrl-C), SIGTERM or SIGHUP (what schedulers and closed terminals send) sets
    `requested` to the signal, so the loop can save and stop between steps; a second one interrupts at once."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum


class Trainer:
    """Owns the model, optimizer, schedule, data and progress of one run directory; `plan` (distributed/plan.py,
    resolved with the run config) says how the processes share the work."""

    def __init__(self, run: RunConfig, run_dir: Path, data_dir: Path, plan: ParallelPlan,
                 resume: bool = False) -> None:
        self.run, self.cfg, self.run_dir, self.data_dir, self.plan = run, run.train, run_dir, data_dir, plan
        self.device = plan.parallel.device
        self.autocast = plan.autocast()
        self.compute_dtype = plan.compute_dtype
        if self.cfg.deterministic and self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its handle
            torch.use_deterministic_algorithms(True)
        self.val_tokens = open_split(data_dir, "val")
        check_eval_windows(self.val_tokens, self.cfg.seq_len, f"the validation split of {data_dir}")
        self.batches = PackedBatches(open_split(data_dir, "train"), self.cfg.batch_size, self.cfg.seq_len,
                                     self.cfg.seed)
        self.tokenizer_path = data_dir / TOKENIZER_FILE
        self.byte_lengths = token_byte_lengths(load_tokenizer(self.tokenizer_path))
        self.peak_flops = self.cfg.peak_flops or (
            GPU_PEAK_FLOPS if self.device.type == "cuda" else CPU_PEAK_FLOPS_PER_THREAD * torch.get_num_threads())
        self.peak_flops *= plan.parallel.world_size  # tokens/s are counted over all processes
        self.last_saved: Path | None = None
        self.saved_step: int | None = None
        if resume and not list_checkpoints(run_dir):  # stopped before its first checkpoint: nothing to restore
            print(f"note: --resume: {run_dir} has no checkpoint yet; starting from step 0", file=sys.stderr)
            resume = False
        if resume:
            self._restore()
        else:
            self._fresh()

    def _fresh(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self._build()
        self.progress = Progress()

    def _build(self, model: Transformer | None = None, initialise: bool = True) -> None:
        """The model as the plan lays it out (`model`, loaded in full, or a new one: `plan.build`), then the
        optimizer and schedule over what this process holds."""
        self.model, self.module = self.plan.build(self.run.model, model, initialise)
        self.runtime = for_device(self.model, self.device)
        self.optimizer = build_optimizer(self.model, self.cfg)
        if self.runtime is not None:
            self.runtime.attach_optimizer(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)

    def _restore(self) -> None:
        """Continue from the newest checkpoint, single-file or sharded, whatever layout and world size wrote it."""
        ckpt, state, model = self._newest_readable_checkpoint()
        if model is None:  # sharded: the weights load into the model as this plan lays it out
            torch.manual_seed(self.cfg.seed)
        self._build(model, initialise=False)
        if is_sharded(ckpt):
            load_sharded(ckpt, self.model, self.optimizer, self.plan.parallel)
        else:
            self.optimizer.load_state_dict(self.plan.shard_optimizer_state(state["optimizer"], self.optimizer,
                                                                           self.model))
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.progress = state["progress"]
        self.last_saved, self.saved_step = ckpt, self.progress.step

    def _newest_readable_checkpoint(self) -> tuple[Path, dict[str, Any], Transformer | None]:
        """The newest checkpoint whose training state and weights load (a sharded one's weights load later); a
        damaged newer one (a file truncated by a full disk or a crash outside the atomic save) is skipped with a
        warning. A checkpoint of another model is an error."""
        problem = ""
        for ckpt in reversed(list_checkpoints(self.run_dir)):
            try:
                state = load_training_state(ckpt)
                model = None if is_sharded(ckpt) else load_checkpoint(ckpt, device=self.device)[0]
                config = ModelConfig.from_dict(json.loads((ckpt / CONFIG_FILE).read_text()))
            except FileNotFoundError:
                raise
            except Exception as exc:  # safetensors, torch.load and zip readers raise their own types
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"warning: --resume: checkpoint {ckpt} cannot be read ({problem}); trying an older one",
                      file=sys.stderr, flush=True)
                continue
            if config != self.run.model:
                raise UserValueError(f"--resume: the model config differs from the checkpoint's ({ckpt}); "
                                 "model.* cannot change when resuming")
            return ckpt, state, model
        raise UserValueError(f"--resume: no checkpoint in {self.run_dir} can be read (the oldest: {problem})")

    # ------------------------------------------------------------------------------------------ one step
    def next_micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _ in range(self.cfg.grad_accum):
            inputs, targets = (self.plan.local_batch(t) for t in self.batches.batch(self.progress.data_index))
            self.progress.data_index += 1
            out.append((inputs.to(self.device), targets.to(self.device)))
        return out

    def train_step(self) -> StepResult:
        losses, counts = forward_backward(self.model, self.next_micro_batches(), self.autocast, self.module)
        losses, counts = self.plan.reduce(losses, counts)
        grad_norm, finite = optimizer_step(self.model, self.optimizer, self.scheduler, self.cfg, losses[0],
                                           partial(self.plan.clip, self.model))
        self.progress.step += 1
        self._count_nonfinite(finite)
        return StepResult(dict(zip(_LOSS_NAMES, losses.tolist())), counts.cpu(), grad_norm, finite)

    def _count_nonfinite(self, finite: bool) -> None:
        p = self.progress
        if finite:
            p.nonfinite_in_row = 0
            return
        p.nonfinite_total += 1
        p.nonfinite_in_row += 1
        if p.nonfinite_in_row >= self.cfg.max_nonfinite:
            good = self.last_saved or (list_checkpoints(self.run_dir) or [None])[-1]
            raise UserError(f"stopping at step {p.step}: {p.nonfinite_in_row} non-finite losses in a row "
                           f"(train.max_nonfinite={self.cfg.max_nonfinite}); last good checkpoint: "
                           f"{good or 'none'}; try a lower train.lr")

    # ------------------------------------------------------------------------------------------ the loop
    def release(self) -> None:
        """Drop the model, its parallel wrappers and the optimizer before the process groups are destroyed. A DDP
        reducer holds its group: were it the group's last holder, the group would be destroyed while this thread
        holds the GIL, and gloo's worker threads, which need the GIL to free the tensors of the last collectives,
        would wait on it forever (torchrun's processes then never exit)."""
        self.model = self.module = self.optimizer = None  # type: ignore[assignment]
        gc.collect()

    def fit(self, logger: MetricsLogger) -> int | None:
        """Train to max_steps; returns the signal that stopped it early (after saving), None when it ran to the
        end."""
        cfg, p = self.cfg, self.progress
        window_time, window_steps, window_counts = 0.0, 0, None
        with StopRequest() as stop:
            while p.step < cfg.max_steps:
                started = time.perf_counter()
                result = self.train_step()
                window_time += time.perf_counter() - started
                window_steps += 1
                window_counts = result.counts_LE + (0 if window_counts is None else window_counts)
                logger.advance(p.step, result.losses["lm_loss"])
                if not result.finite:
                    logger.message(f"step {p.step}: non-finite loss, update skipped "
                                   f"({p.nonfinite_in_row} in a row)")
                if p.step % cfg.log_every == 0 or p.step == cfg.max_steps:
                    logger.log(self._train_record(result, window_time, window_steps, window_counts))
                    window_time, window_steps, window_counts = 0.0, 0, None
                if cfg.eval_every and p.step % cfg.eval_every == 0 and p.step < cfg.max_steps:
                    logger.log({"kind": "val", "step": p.step, **self.validate()})
                if cfg.save_every and p.step % cfg.save_every == 0:
                    self.save()
                if stop.requested is not None:
                    self.save()
                    logger.message(f"interrupted ({signal.Signals(stop.requested).name}): saved step {p.step} to "
                                   f"{self.last_saved}")
                    return stop.requested
        if self.saved_step != p.step:
            self.save()
        return None

    def _train_record(self, r: StepResult, seconds: float, steps: int, counts_LE: torch.Tensor) -> dict[str, Any]:
        """The step's losses; speed, routing health and device load over the `steps` since the last record."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        tokens_per_s = tokens_per_step * steps / max(seconds, 1e-9)
        return {"kind": "train", "step": self.progress.step, "lr": lr_at(self.progress.step - 1, cfg),
                **r.losses, "grad_norm": r.grad_norm, "tokens_per_s": tokens_per_s,
                "mfu": estimate_mfu(self.run.model, cfg.seq_len, tokens_per_s, self.peak_flops),
                "tokens": self.progress.step * tokens_per_step, "skipped_steps": self.progress.nonfinite_total,
                **routing_health(counts_LE), **device_load_record(counts_LE, self.model.config, self.plan.parallel)}

    def validate(self, final: bool = False) -> dict[str, float]:
        limit = self.cfg.final_eval_batches if final else self.cfg.eval_batches
        return validation_metrics(self.model, self.val_tokens, self.cfg, self.byte_lengths, self.autocast, limit)

    def save(self) -> Path:
        """A checkpoint of this step: sharded (every process writes its shards) or the gathered full state."""
        tokenizer = self.tokenizer_path if self.tokenizer_path.is_file() else None
        if self.plan.sharded_checkpoints:
            self.last_saved = save_sharded_training_checkpoint(
                self.run_dir, self.model, self.optimizer, self.scheduler, self.progress, self.run.to_yaml(),
                tokenizer, self.cfg.keep_last, self.plan.parallel)
        else:
            model, optimizer_state = self.plan.gather_for_save(self.model, self.optimizer)  # full, world-size free
            self.last_saved = self.plan.on_main(lambda: save_training_checkpoint(
                self.run_dir, model, optimizer_state, self.scheduler, self.progress, self.run.to_yaml(), tokenizer,
                self.cfg.keep_last))
        self.saved_step = self.progress.step
        return self.last_saved

