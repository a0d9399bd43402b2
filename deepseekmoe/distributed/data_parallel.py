"""Data parallelism around expert parallelism, and the pieces a training loop needs under torchrun.

Gradient bookkeeping. Rank r computes L_r, the mean loss of its own slice of the global batch; the global loss
is L = (1/W) sum_r L_r over the W = dp * ep ranks (exact when every slice has as many sequences and tokens).
  * Replicated parameters: DistributedDataParallel averages dL_r/dtheta over all W ranks.
  * Expert parameters (DDP ignores them): the backward all-to-all already sums the contributions of the EP
    group's losses into the rank holding the expert, so a hook all-reduces (sums) them over the expert's dp
    replicas and divides by W.
DDP, not FSDP2: both run on gloo (fully_shard works on CPU), but on 2 CPU processes a tiny-deepseekmoe step took
1622 ms with DDP against 1825 ms with FSDP2 (`benchmarks/all_to_all.py --compare-wrappers`), DDP keeps plain
tensors so the optimizer, clipping and state-dict code stays single-device, and the 16B model trains with
replicated dense weights (1.4B parameters) on 8 x 80 GB GPUs with ep=8 (`deepseekmoe plan`). Where the dense part
itself outgrows a GPU (145B: ~10B dense parameters, 160 GB of weights + AdamW state), fsdp.py shards it with
fully_shard over all ranks and each expert block over its dp replicas (`deepseekmoe plan --fsdp`); the trainer runs
this DDP layout unless told `--fsdp` (plan.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserValueError
from ..model import Transformer
from .expert_parallel import apply_expert_parallel, expert_parameters
from .mesh import Parallel


def _expert_grad_hook(dp_group: dist.ProcessGroup | None, dp: int, world: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        if dp > 1:
            dist.all_reduce(grad, group=dp_group)
        return grad.div_(world)
    return hook


def apply_data_parallel(model: Transformer, parallel: Parallel) -> nn.Module:
    """Wrap for data parallelism; returns the module to call (DDP, or the model itself for one process)."""
    if not parallel.is_distributed:
        return model
    experts = {id(p) for p in expert_parameters(model)}
    ignored = [name for name, p in model.named_parameters() if id(p) in experts]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    for p in expert_parameters(model):
        p.register_hook(_expert_grad_hook(parallel.dp_group, parallel.dp, parallel.world_size))
    device_ids = [parallel.device.index] if parallel.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def parallelize(model: Transformer, parallel: Parallel) -> nn.Module:
    """Expert parallel (when ep > 1), then data parallel. The model is changed in place; the returned module
    is the one to call for training. The model's config is used as it is: a trainer's carries the EP ranks as
    the device-level balance loss's devices (`expert_parallel.with_ep_device_groups`), as the paper does for 145B."""
    if parallel.ep > 1:
        apply_expert_parallel(model, parallel.ep_group)
    return apply_data_parallel(model, parallel)


def local_batch(batch: torch.Tensor, parallel: Parallel) -> torch.Tensor:
    """This rank's contiguous slice (dim 0) of a global batch; the slices of all ranks tile it in rank order."""
    b, w = batch.shape[0], parallel.world_size
    if b % w:
        raise UserValueError(f"batch size {b} is not divisible by the world size {w}")
    return batch[parallel.rank * (b // w):(parallel.rank + 1) * (b // w)]


def clip_grad_norm_(model: nn.Module, max_norm: float, parallel: Parallel) -> torch.Tensor:
    """Clip by the global gradient norm, the same on every rank: replicated gradients count once, expert
    gradients are summed over the EP group. Call after backward; returns the total norm (before clipping)."""
    experts = {id(p) for p in expert_parameters(model)}
    with_grad = [p for p in model.parameters() if p.grad is not None]
    dense_sq = _sum_sq([p.grad for p in with_grad if id(p) not in experts], parallel.device)
    expert_sq = _sum_sq([p.grad for p in with_grad if id(p) in experts], parallel.device)
    if parallel.is_distributed and parallel.ep > 1:
        dist.all_reduce(expert_sq, group=parallel.ep_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in with_grad:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total


def _sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=device))
