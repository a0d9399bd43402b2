"""Process groups for expert x data parallelism: a (dp, ep) DeviceMesh and where this process sits in it.

Layout: rank = dp_index * ep + ep_index, so the ranks of one expert-parallel group are consecutive (on GPUs, one
node's NVLink domain carries the all-to-all). Every rank reads its own slice of the global batch: the EP ranks of
one group share the routed experts of each layer (each holds E/ep of them) but not their tokens. Under DDP the dense
part of the model (embeddings, attention, dense FFNs, shared experts, routers, norms, LM head) is replicated on all
dp * ep ranks and each routed expert on the dp ranks that hold the same expert block; FSDP2 (fsdp.py) shards both
over those same ranks instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from ..errors import UserValueError


@dataclass
class Parallel:
    """This process's place in the (dp, ep) mesh; `mesh` is None for a single process."""

    mesh: DeviceMesh | None
    dp: int
    ep: int
    rank: int
    device: torch.device

    @property
    def world_size(self) -> int:
        return self.dp * self.ep

    @property
    def is_distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.mesh["ep"].get_group() if self.mesh is not None else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh["dp"].get_group() if self.mesh is not None else None


def check_sizes(world_size: int, ep: int, n_routed_experts: int | None) -> None:
    """Raise ValueError unless `ep` divides the world size and every EP rank gets at least one routed expert."""
    if ep < 1:
        raise UserValueError(f"ep={ep} is invalid: expected an integer >= 1")
    if ep > world_size:
        raise UserValueError(f"ep={ep} needs at least {ep} processes (GPUs), got {world_size}; launch with "
                         f"torchrun --nproc-per-node {ep} ...")
    if world_size % ep:
        raise UserValueError(f"ep={ep} does not divide the number of processes (GPUs) {world_size}")
    if ep > 1 and n_routed_experts is None:
        raise UserValueError(f"ep={ep} needs a model with routed experts (this one is dense)")
    if n_routed_experts is not None and ep > n_routed_experts:
        raise UserValueError(f"ep={ep} exceeds n_routed_experts={n_routed_experts}: every EP rank needs an expert")


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_parallel(ep: int = 1, n_routed_experts: int | None = None,
                  device: torch.device | None = None) -> Parallel:
    """Join the process group torchrun describes (WORLD_SIZE/RANK/MASTER_ADDR...) and build the (dp, ep) mesh.

    One process (no WORLD_SIZE, or WORLD_SIZE=1) gives a Parallel with mesh None and needs ep == 1.
    Backend: nccl on CUDA, gloo on CPU.
    """
    device = device or default_device()
    world = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    check_sizes(world, ep, n_routed_experts)
    if world == 1:
        return Parallel(None, 1, 1, 0, device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return Parallel(mesh, world // ep, ep, dist.get_rank(), device)


def shutdown(parallel: Parallel) -> None:
    """Leave the process group (a no-op for one process)."""
    if parallel.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
