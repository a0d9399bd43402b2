"""The parallel plan: the one object between the trainer and the rest of distributed/, resolved once per run.

A training step reads  batch -> forward/backward -> reduce -> step:
    inputs = plan.local_batch(batch)               this process's slice of the global batch (all of it on one)
    (forward and backward through module = plan.parallelize(model), applied once to the full model)
    losses, counts = plan.reduce(losses, counts)   step statistics over the processes
    norm = plan.clip(model, max_norm)              the global gradient norm, clipped; then the optimizer steps
Checkpoints: with `sharded_checkpoints` every process writes its own shards (train/sharded_checkpoint.py);
otherwise `gather_for_save` gives the full single-device model and optimizer state that rank 0 writes (`on_main`).
`shard_optimizer_state` cuts a full optimizer state (a single-file checkpoint) down to what this process holds.

Plans: `ParallelPlan` (the interface, and the null plan of one process), `DataParallel` (DDP + EP under
torchrun) and `FullySharded` (FSDP2 + EP, `train.fsdp`, on one process or N). `resolve_plan(run, ep, device)` joins
torchrun's process group, builds the (dp, ep) mesh and resolves the run config against it (the EP ranks as
device-level balance groups, the batch split); the plan and the config it returns are frozen: nothing changes
either later.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserValueError
from ..model import Transformer
from ..model.init import DrawsOnMeta, reset_tables
from . import data_parallel, fsdp, training
from .expert_parallel import with_ep_device_groups
from .mesh import Parallel, init_parallel

T = TypeVar("T")


@dataclass(frozen=True)
class ParallelPlan:
    """The interface, and the null plan of one process: the model as built, torch's own clipping, single-file
    checkpoints."""

    parallel: Parallel
    bf16: bool = False
    """bf16 compute (autocast; weights, optimizer state and losses stay fp32)."""
    activation_checkpointing: bool = False
    sharded_checkpoints: ClassVar[bool] = False

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> AbstractContextManager | None:
        return torch.autocast(self.parallel.device.type, dtype=torch.bfloat16) if self.bf16 else None

    def build(self, config: ModelConfig, model: Transformer | None = None,
              initialise: bool = True) -> tuple[Transformer, nn.Module]:
        """(the model as this plan lays it out, in training mode; the module to call): `model` (full, loaded) or
        a new one, whose weights are initialised from the global generator as `Transformer(config)` initialises
        them, or (initialise=False) left for a checkpoint to fill. Here: the full model, built on the CPU, moved."""
        model = (model if model is not None else Transformer(config).to(self.parallel.device)).train()
        return model, self.parallelize(model)

    def parallelize(self, model: Transformer) -> nn.Module:
        """Apply the plan to the full model (in place); returns the module to call for training."""
        if self.activation_checkpointing:
            fsdp.checkpoint_blocks(model)
        return model

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def reduce(self, losses: torch.Tensor, counts_LE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return losses, counts_LE

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def gather_for_save(self, model: Transformer,
                        optimizer: torch.optim.Optimizer) -> tuple[Transformer, dict[str, Any]]:
        """The full model and optimizer state dict that a single-file checkpoint holds."""
        return model, optimizer.state_dict()

    def shard_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                              model: nn.Module) -> dict[str, Any]:
        return state

    def generation_context(self) -> AbstractContextManager:
        """Where to generate with the trained model (the end-of-training sample)."""
        return nullcontext()

    def on_main(self, fn: Callable[[], T]) -> T:
        return training.on_main(self.parallel, fn)

    def describe(self) -> str:
        return ""


@dataclass(frozen=True)
class DataParallel(ParallelPlan):
    """torchrun: routed experts split over the EP group, DDP for the replicated rest (data_parallel.py)."""

    def parallelize(self, model: Transformer) -> nn.Module:
        return data_parallel.parallelize(model, self.parallel)

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        return data_parallel.local_batch(batch, self.parallel)

    def reduce(self, losses: torch.Tensor, counts_LE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return training.reduce_step_stats(losses, counts_LE, self.parallel)

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return data_parallel.clip_grad_norm_(model, max_norm, self.parallel)

    def gather_for_save(self, model: Transformer,
                        optimizer: torch.optim.Optimizer) -> tuple[Transformer, dict[str, Any]]:
        return training.gather_training_state(model, optimizer, self.parallel)

    def shard_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                              model: nn.Module) -> dict[str, Any]:
        return training.shard_optimizer_state(state, optimizer, model)

    def describe(self) -> str:
        p = self.parallel
        return f"{p.world_size} processes (dp {p.dp} x ep {p.ep})"


@dataclass(frozen=True)
class FullySharded(DataParallel):
    """FSDP2 around expert parallelism (fsdp.py): parameters, gradients and AdamW state sharded; sharded
    checkpoints. bf16 is FSDP2's mixed-precision policy (fp32 master weights and gradient reduction) under
    torchrun; on one process the model stays whole and bf16 is autocast, as for one process without it."""

    sharded_checkpoints: ClassVar[bool] = True

    def autocast(self) -> AbstractContextManager | None:
        return None if self.parallel.is_distributed else super().autocast()

    def generation_context(self) -> AbstractContextManager:
        """bf16 parameters meet the fp32 KV cache a generation allocates from the sharded parameters' dtype: autocast
        makes attention take both in bf16."""
        return super().autocast() if self.bf16 and self.parallel.is_distributed else nullcontext()

    def build(self, config: ModelConfig, model: Transformer | None = None,
              initialise: bool = True) -> tuple[Transformer, nn.Module]:
        """Under torchrun a new model is built on the meta device, laid out, and only this rank's shards are
        materialised: initialised bit for bit as one process initialises the whole model (`fsdp.init_shards`,
        the generators left as that build leaves them), or left for a sharded checkpoint to fill."""
        if model is not None or not self.parallel.is_distributed:
            return super().build(config, model, initialise)
        with torch.device("meta"), DrawsOnMeta() if initialise else nullcontext():
            model = Transformer(config).train()
        module = self.parallelize(model)
        model.to_empty(device=self.parallel.device)
        if initialise:
            fsdp.init_shards(model)
        reset_tables(model)
        return model, module

    def parallelize(self, model: Transformer) -> nn.Module:
        return fsdp.apply_fsdp(model, self.parallel, activation_checkpointing=self.activation_checkpointing,
                               policy=fsdp.precision_policy(self.bf16))

    def clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        if not self.parallel.is_distributed:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return fsdp.clip_grad_norm_(model, max_norm, self.parallel)

    def gather_for_save(self, model: Transformer,
                        optimizer: torch.optim.Optimizer) -> tuple[Transformer, dict[str, Any]]:
        raise TypeError("a fully sharded run saves sharded checkpoints (train.sharded_checkpoint.save_sharded)")

    def describe(self) -> str:
        return f"FSDP2, {super().describe()}" if self.parallel.is_distributed else "FSDP2 layout, one process"


def resolve_plan(run: Any, ep: int, device: torch.device) -> tuple[Any, ParallelPlan]:
    """Join torchrun's process group (when WORLD_SIZE > 1) with a (dp, ep) mesh -> (the run config resolved for it,
    the plan). `run` is a train RunConfig; its model gets the EP ranks as device-level groups
    (`with_ep_device_groups`) and train.batch_size must split evenly over the processes."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    cfg = run.train
    check_options(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    parallel = init_parallel(ep, run.model.n_routed_experts if run.model.is_moe else None, device)
    training.check_batch(cfg.batch_size, parallel)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    kind = FullySharded if cfg.fsdp else DataParallel if parallel.is_distributed else ParallelPlan
    run = dataclasses.replace(run, model=with_ep_device_groups(run.model, ep))
    return run, kind(parallel, bf16, cfg.activation_checkpointing)


def check_options(cfg: Any, world_size: int) -> None:
    """Refuse train options that no plan runs together (ValueError naming them), before any process group."""
    if cfg.activation_checkpointing and world_size > 1 and not cfg.fsdp:
        raise UserValueError(f"train.activation_checkpointing=true on {world_size} processes needs train.fsdp=true "
                         "(--fsdp)")
