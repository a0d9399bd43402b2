"""FSDP2 (`fully_shard`) around expert parallelism: parameters, gradients and AdamW states sharded, not replicated.

Layout on the (dp, ep) mesh of `mesh.py` (W = dp x ep ranks):
  * the dense part (embeddings, attention, dense FFNs, shared experts, routers, norms, LM head) is sharded over all
    W ranks: one FSDP unit per block, and the root for the embeddings, final norm and head;
  * each MoE layer's routed experts are the rank's EP block (`expert_parallel.py`), and that block is sharded over
    the dp ranks holding the same block (the "dp" sub-mesh), as its own FSDP unit inside the block's.
In forward a unit all-gathers its parameters, runs, and frees them again; backward reduce-scatters the gradients,
so each rank keeps 1/W of every dense tensor and 1/dp of its expert block, for weights, gradients and optimizer.

Gradient bookkeeping (as with DDP in `data_parallel.py`): rank r computes L_r, the mean loss of its slice; the
global loss is L = (1/W) sum_r L_r. A dense unit's reduce-scatter averages over its W ranks: dL/dtheta. The
backward all-to-all already sums the EP group's contributions into the expert's rank, so an expert unit sums over
its dp ranks and divides by W (`set_gradient_divide_factor`), not by its own mesh size dp (a sum, then a
division: gloo has no pre-scaled sum).

Precision: on CUDA, bf16 parameters for compute and fp32 gradient reduction, with the sharded fp32 parameters as the
master weights AdamW updates (`mixed_precision`); on CPU everything stays fp32.

Activation checkpointing (`activation_checkpointing=True`): each block keeps only its input for backward and runs its
forward again there (the composable `checkpoint`, so parameter names do not change), all-to-all exchanges included.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..model import Transformer
from ..model.init import init_order
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel, gather_blocks
from .mesh import Parallel


def precision_policy(bf16: bool) -> MixedPrecisionPolicy:
    """bf16 parameters for compute with fp32 gradient reduction (the sharded fp32 parameters stay the master
    weights), or fp32 throughout (no casts)."""
    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 reduction on CUDA; fp32 (no casts) elsewhere."""
    return precision_policy(device.type == "cuda")


def world_mesh(parallel: Parallel) -> DeviceMesh:
    """A 1-D mesh over all W ranks, in rank order: the dense part's sharding dimension."""
    return init_device_mesh(parallel.device.type, (parallel.world_size,), mesh_dim_names=("world",))


def checkpoint_blocks(model: Transformer) -> None:
    """Per-block activation checkpointing: keep each block's input, recompute its forward in backward. Whole
    blocks are recomputed (no early stop), so every rank runs the same all-to-alls again, also a rank whose experts
    received no rows and so saved fewer tensors."""
    for block in model.layers:
        checkpoint(block, early_stop=False)


def apply_fsdp(model: Transformer, parallel: Parallel, *, activation_checkpointing: bool = False,
               reshard_after_forward: bool = True, policy: MixedPrecisionPolicy | None = None) -> Transformer:
    """Expert parallel (ep > 1), then FSDP2 units: experts over dp, blocks and root over all ranks. The model is
    changed in place and is the module to call; its config is used as it is (a trainer's carries the EP ranks as
    device-level groups: `expert_parallel.with_ep_device_groups`). One process: only activation checkpointing
    applies. `policy` defaults to `mixed_precision(parallel.device)`."""
    if activation_checkpointing:
        checkpoint_blocks(model)
    if not parallel.is_distributed:
        return model
    if parallel.ep > 1:
        apply_expert_parallel(model, parallel.ep_group)
    policy, mesh = policy or mixed_precision(parallel.device), world_mesh(parallel)
    expert_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                         cast_forward_inputs=False)  # gate weights stay fp32
    for moe in model.moe_layers():
        unit = fully_shard(moe.experts, mesh=parallel.mesh["dp"], mp_policy=expert_policy,
                           reshard_after_forward=reshard_after_forward)
        unit.set_gradient_divide_factor(float(parallel.world_size))
        if parallel.dp > 1:  # a sum, then a division: gloo has no PREMUL_SUM (and on a mesh of one rank
            unit.set_force_sum_reduction_for_comms(True)  # torch 2.13 would divide twice with it)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


@torch.no_grad()
def init_shards(model: Transformer) -> None:
    """Initialise the shards of a model built on the meta device, laid out by `apply_fsdp` and materialised
    (`to_empty`) exactly as `init_weights` initialises the whole model on the CPU: the same generator, the same
    order. Each weight is drawn in full on the CPU, one at a time, and only this rank's part is kept: its EP block
    of the experts, then its FSDP shard. Rotary and hash tables are left to `reset_tables`."""
    std = model.config.initializer_range
    for module, name, drawn in init_order(model):
        param = getattr(module, name)
        if not drawn:
            local_tensor(param).fill_(1.0)
            continue
        ep = module if isinstance(module, ExpertParallelExperts) else None
        shape = (ep.num_experts, *param.shape[1:]) if ep is not None else param.shape
        full = torch.empty(shape, dtype=param.dtype).normal_(0.0, std)
        copy_shard(param, full[ep.first:ep.first + ep.num_local] if ep is not None else full)


def copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's rows of `full` (the whole tensor, on any device) into `param`: an FSDP2 parameter
    (dim-0 chunks of ceil(n / mesh size) rows, the last ones shorter or empty, as torch.chunk cuts) or a plain one."""
    rows = full
    if isinstance(param, DTensor):
        if param.placements != (Shard(0),):
            raise ValueError(f"copy_shard: expected FSDP2's Shard(0), got {param.placements}")
        mesh = param.device_mesh
        chunk = -(-full.shape[0] // mesh.size())
        rows = full[mesh.get_local_rank() * chunk:(mesh.get_local_rank() + 1) * chunk]
    local = local_tensor(param)
    if local.shape != rows.shape:
        raise ValueError(f"copy_shard: the local shard is {tuple(local.shape)}, the rows {tuple(rows.shape)}")
    local.copy_(rows)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters, gradients, optimizer states); a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(model: nn.Module, max_norm: float, parallel: Parallel) -> torch.Tensor:
    """Clip by the global gradient norm, the same on every rank. Every gradient element lives on exactly one rank
    (dense shards over W, expert shards over dp within each EP block), so the norm is the square root of the local
    squares summed over all ranks. Returns the total norm before clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sq = sum((local_tensor(g).float().pow(2).sum() for g in grads), torch.zeros((), device=parallel.device))
    if parallel.is_distributed:
        dist.all_reduce(sq)
    total = sq.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            local_tensor(g).mul_(coef.to(g.dtype))
    return total


def full_tensor(t: torch.Tensor, module: ExpertParallelExperts | None) -> torch.Tensor:
    """The whole tensor behind this rank's shard: FSDP shards all-gathered, then EP blocks. Collective."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return gather_blocks(full, module) if module is not None else full


def gather_full_state(model: Transformer,
                      optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(the single-device model state, name -> full AdamW state of that parameter), on every rank. Collective."""
    owner = {f"{prefix}.{n}": m for prefix, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
             for n, _ in m.named_parameters(recurse=False)}
    state = {name: full_tensor(t, owner.get(name)).detach().clone() for name, t in model.state_dict().items()}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p in (p for group in optimizer.param_groups for p in group["params"]):  # the same order on all ranks
            name, entry = names[id(p)], optimizer.state[p]
            moments[name] = {k: full_tensor(v, owner.get(name)).clone() if v.dim() else v.clone()
                             for k, v in entry.items()}
    return state, moments
