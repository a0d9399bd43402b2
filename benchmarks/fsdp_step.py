"""One training step of the trainer (`train --fsdp` against `train`, under torchrun) per rank: time and memory.

    torchrun --nproc-per-node N benchmarks/fsdp_step.py --wrapper fsdp|ddp --ep E [--preset tiny-deepseekmoe]
             [--batch 8] [--seq-len 128] [--repeats 5] [--checkpoint-blocks] [--json]
    python benchmarks/fsdp_step.py ...     (one process: the model as built, either wrapper)

The step is the trainer's own: the parallel plan `train` resolves (distributed/plan.py: FullySharded for
--wrapper fsdp, i.e. train.fsdp, DataParallel otherwise), trainer.forward_backward, plan.reduce, and
trainer.optimizer_step with the plan's global-norm clip and AdamW; only the data is one fixed random batch.
gloo on CPU (one thread per process), NCCL on CUDA (bf16 compute: FSDP2's mixed-precision policy, autocast for
DDP). The global batch (--batch sequences) is split over the N processes. Reported, rank 0 prints:
  * step_ms      median over --repeats (after one warm-up step) of the slowest rank (barrier before each step);
  * state_MB     per rank, parameters + gradients + AdamW states as held (FSDP shards, DDP replicas);
  * peak_MB      per rank, CUDA max_memory_allocated, or on CPU the process's peak RSS (ru_maxrss: includes the
                 Python/torch runtime, about 300-400 MB, so only differences between runs mean much).
One wrapper per launch, so each peak is its own run's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from functools import partial

import torch
import torch.distributed as dist

from deepseekmoe import load_preset
from deepseekmoe.distributed import shutdown
from deepseekmoe.distributed.fsdp import local_tensor
from deepseekmoe.distributed.plan import resolve_plan
from deepseekmoe.model import Transformer
from deepseekmoe.train.config import RunConfig, TrainConfig
from deepseekmoe.train.optim import build_optimizer, build_scheduler
from deepseekmoe.train.trainer import forward_backward, optimizer_step


def _bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = local_tensor(t)
    return t.numel() * t.element_size()


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    params = list(model.parameters())
    moments = sum(_bytes(v) for p in params for v in opt.state[p].values() if torch.is_tensor(v) and v.dim())
    return sum(_bytes(p) + _bytes(p.grad) for p in params) + moments


def _per_rank(value: float) -> list[float]:
    values = [value]
    if dist.is_initialized():
        values = [0.0] * dist.get_world_size()
        dist.all_gather_object(values, value)
    return values


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wrapper", choices=("fsdp", "ddp"), default="fsdp")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--preset", default="tiny-deepseekmoe")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint-blocks", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # one GPU per process
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    cfg = TrainConfig(fsdp=args.wrapper == "fsdp", activation_checkpointing=args.checkpoint_blocks,
                      batch_size=args.batch, seq_len=args.seq_len, lr=1e-4, warmup_steps=0, schedule="constant",
                      device=str(device))
    run, plan = resolve_plan(RunConfig(preset=args.preset, model=load_preset(args.preset), train=cfg), args.ep,
                             device)
    parallel = plan.parallel
    torch.manual_seed(0)
    model = Transformer(run.model).to(device).train()
    module = plan.parallelize(model)
    opt, autocast = build_optimizer(model, cfg), plan.autocast()
    sched = build_scheduler(opt, cfg)
    batch = torch.randint(0, run.model.vocab_size, (args.batch, args.seq_len + 1),
                          generator=torch.Generator().manual_seed(1))
    batch = plan.local_batch(batch).to(device)
    state = [0]

    def step() -> None:
        losses, counts = forward_backward(model, [(batch[:, :-1], batch[:, 1:])], autocast, module)
        losses, _ = plan.reduce(losses, counts)
        state[0] = _state_bytes(model, opt)
        optimizer_step(model, opt, sched, cfg, losses[0], partial(plan.clip, model))

    times = []
    for i in range(args.repeats + 1):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(max(_per_rank(time.perf_counter() - start)))
    result = {"preset": args.preset, "processes": parallel.world_size, "dp": parallel.dp, "ep": parallel.ep,
              "plan": type(plan).__name__, "checkpoint_blocks": args.checkpoint_blocks,
              "backend": dist.get_backend() if dist.is_initialized() else "none",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "step_ms": statistics.median(times) * 1e3,
              "state_MB": [round(v / 2**20, 1) for v in _per_rank(state[0])],
              "peak_MB": [round(v, 0) for v in _per_rank(_peak_mb(device))]}
    if parallel.is_main:
        print(json.dumps(result) if args.json else
              "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    shutdown(parallel)


if __name__ == "__main__":
    main()
