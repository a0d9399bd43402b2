"""What the parallel plans (plan.py) share: step statistics over ranks, rank-0-first and rank-0-only blocks, and
world-size independent single-file training checkpoints.

Checkpoints (a gathered full state, not torch.distributed.checkpoint): every rank all-gathers the expert weights
and their AdamW moments over its EP group; rank 0 writes the single-device files (model.safetensors with full
expert tensors, trainer_state.pt with the optimizer state of the full model) through train.state. Optimizer state
is keyed by parameter position, and expert parallelism keeps every parameter in its place, so the same file
resumes at any world size: each rank loads it whole and keeps its experts' block (`shard_optimizer_state`), and
under FSDP2 its shard of that.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from ..config import ModelConfig
from ..errors import UserValueError
from ..model import Transformer
from .expert_parallel import ExpertParallelExperts, expert_bounds, full_model, gather_blocks
from .mesh import Parallel

T = TypeVar("T")


@contextmanager
def main_first(parallel: Parallel) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building shared files), the other ranks after it has finished."""
    if parallel.is_distributed and not parallel.is_main:
        dist.barrier()
    yield
    if parallel.is_distributed and parallel.is_main:
        dist.barrier()


def on_main(parallel: Parallel, fn: Callable[[], T]) -> T:
    """fn() on rank 0 only; every rank returns its result (broadcast), so this also waits for rank 0."""
    if not parallel.is_distributed:
        return fn()
    box = [fn() if parallel.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def gather_training_state(model: Transformer, optimizer: torch.optim.Optimizer,
                          parallel: Parallel) -> tuple[Transformer, dict[str, Any]]:
    """(full model, full optimizer state dict) for train.state to save; the model itself and its optimizer's
    state_dict() for one process. Collective."""
    if not parallel.is_distributed:
        return model, optimizer.state_dict()
    return full_model(model), gather_optimizer_state(optimizer, model)


def device_load_record(counts_LE: torch.Tensor, config: ModelConfig, parallel: Parallel) -> dict[str, Any]:
    """{"device_load": shares per device} for a training log record: devices are the EP ranks, or the
    device-level loss groups on one process; {} when there is only one device."""
    devices = parallel.ep if parallel.ep > 1 else config.n_device_groups
    return {"device_load": device_load(counts_LE, devices)} if devices > 1 and config.is_moe else {}


def check_batch(batch_size: int, parallel: Parallel) -> None:
    if batch_size % parallel.world_size:
        raise UserValueError(f"train.batch_size={batch_size} is not divisible by the {parallel.world_size} processes "
                         "(each takes an equal slice of every micro-batch)")


def reduce_step_stats(losses: torch.Tensor, counts_LE: torch.Tensor,
                      parallel: Parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss means over ranks (each rank's loss is the mean of an equal slice) and expert counts summed."""
    if not parallel.is_distributed:
        return losses, counts_LE
    losses, counts_LE = losses.clone(), counts_LE.clone()
    dist.all_reduce(losses)
    dist.all_reduce(counts_LE)
    return losses / parallel.world_size, counts_LE


def device_load(counts_LE: torch.Tensor, num_devices: int) -> list[float]:
    """Share of all routed assignments that landed on each device's expert block (`expert_bounds`)."""
    if counts_LE.numel() == 0:
        return []
    bounds = expert_bounds(counts_LE.shape[1], num_devices)
    per_expert = counts_LE.sum(0).double()
    total = float(per_expert.sum().clamp(min=1))
    return [float(per_expert[a:b].sum()) / total for a, b in zip(bounds, bounds[1:])]


def _expert_owner(model: torch.nn.Module) -> dict[int, ExpertParallelExperts]:
    return {id(p): m for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


def _positions(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """optimizer.state_dict() with every expert parameter's state tensors all-gathered to full size. Collective."""
    state = optimizer.state_dict()
    owner = _expert_owner(model)
    full = copy.copy(state)
    full["state"] = dict(state["state"])
    for i, param in enumerate(_positions(optimizer)):
        module = owner.get(id(param))
        if module is None or i not in state["state"]:
            continue
        entry = dict(state["state"][i])
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                entry[key] = gather_blocks(value, module)
        full["state"][i] = entry
    return full


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                          model: torch.nn.Module) -> dict[str, Any]:
    """The inverse of `gather_optimizer_state` for this rank: expert state tensors cut to the local block, and for
    FSDP2's DTensor parameters to this rank's shard."""
    owner = _expert_owner(model)
    local = copy.copy(state)
    local["state"] = dict(state["state"])
    for i, param in enumerate(_positions(optimizer)):
        module = owner.get(id(param))
        if module is None or i not in state["state"]:
            continue
        block = slice(module.first, module.first + module.num_local)
        local["state"][i] = {k: v[block].clone() if torch.is_tensor(v) and v.dim() == param.dim() else v
                             for k, v in state["state"][i].items()}
    for i, param in enumerate(_positions(optimizer)):
        if isinstance(param, DTensor) and i in local["state"]:
            local["state"][i] = {k: _like(v, param) for k, v in local["state"][i].items()}
    return local


def _like(value: Any, param: DTensor) -> Any:
    """A full (or EP block) state tensor as a DTensor sharded like `param`; each rank cuts its own shard."""
    if not torch.is_tensor(value) or value.dim() != param.dim():
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


class NullLogger:
    """Stands in for train.metrics.MetricsLogger on ranks other than 0."""

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None

    def log(self, *args: Any, **kwargs: Any) -> None:
        return None

    def message(self, *args: Any, **kwargs: Any) -> None:
        return None
