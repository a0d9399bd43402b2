"""Scale-out on torch.distributed, applied from outside the single-device model.

    mesh.py             (dp, ep) DeviceMesh from torchrun's environment; gloo on CPU, nccl on GPU
    expert_parallel.py  routed experts split over the EP group; all-to-all dispatch and combine
    data_parallel.py    DDP for the replicated part, expert gradients reduced over their DP replicas,
                        global gradient clipping, batch sharding
    fsdp.py             FSDP2 around expert parallelism: dense part over all ranks, each expert block over its
                        dp replicas; mixed precision on CUDA, per-block activation checkpointing, clipping
    training.py         what the plans share: step statistics over ranks, gathered optimizer state
                        (world-size independent checkpoints), per-device load
    plan.py             the parallel plan the trainer holds (one process, DDP + EP, FSDP2 + EP): local batch,
                        reduce, clip, gather or shard for checkpoints; resolved once per run from torchrun
    planner.py          `deepseekmoe plan`: per-GPU memory, all-to-all bytes and step time on paper
Sharded training checkpoints (torch.distributed.checkpoint) live with the trainer's: train/sharded_checkpoint.py.

Usage: `torchrun --nproc-per-node N -m deepseekmoe train ... --ep E [--fsdp]` (N / E data-parallel replicas; the
same config runs on one process). In code: `parallel = init_parallel(ep, n_routed_experts)`, then
`module = parallelize(model, parallel)`, `local_batch(batch, parallel)`, `clip_grad_norm_(model, 1.0, parallel)`.
"""

from .data_parallel import (
    apply_data_parallel, clip_grad_norm_, local_batch, parallelize,
)
from .expert_parallel import ExpertParallelExperts, all_to_all, apply_expert_parallel, gather_full_state
from .mesh import Parallel, check_sizes, init_parallel, shutdown

__all__ = [
    "ExpertParallelExperts", "Parallel", "all_to_all", "apply_data_parallel", "apply_expert_parallel",
    "check_sizes", "clip_grad_norm_", "gather_full_state", "init_parallel", "local_batch", "parallelize",
    "shutdown",
]
