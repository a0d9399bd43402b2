"""One training step (forward, backward, clip, AdamW) with FSDP2 + EP against DDP + EP, per rank: time and memory.

    torchrun --nproc-per-node N benchmarks/fsdp_step.py --wrapper fsdp|ddp --ep E [--preset tiny-deepseekmoe]
             [--batch 8] [--seq-len 128] [--repeats 5] [--checkpoint-blocks] [--json]
    python benchmarks/fsdp_step.py ...     (one process: the plain model, no wrapper)

gloo on CPU (one thread per process), NCCL on CUDA (bf16 compute: FSDP2's mixed-precision policy, autocast for
DDP). The global batch (--batch sequences) is split over the N processes. Reported, rank 0 prints:
  * step_ms      median over --repeats (after one warm-up step) of the slowest rank (barrier before each step);
  * state_MB     the largest rank's parameters + gradients + AdamW states as held (FSDP shards, DDP replicas);
  * peak_MB      the largest rank's peak: CUDA max_memory_allocated, or on CPU the process's peak RSS (ru_maxrss:
                 includes the Python/torch runtime, about 300-400 MB, so only differences between runs mean much).
One wrapper per launch, so each peak is its own run's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from deepseekmoe import Transformer, load_preset
from deepseekmoe.distributed import init_parallel, local_batch, parallelize, shutdown
from deepseekmoe.distributed.data_parallel import clip_grad_norm_ as ddp_clip
from deepseekmoe.distributed.expert_parallel import with_ep_device_groups
from deepseekmoe.distributed.fsdp import apply_fsdp, clip_grad_norm_ as fsdp_clip, local_tensor
from deepseekmoe.losses import total_loss
from deepseekmoe.train.optim import param_groups


def _bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = local_tensor(t)
    return t.numel() * t.element_size()


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    params = list(model.parameters())
    moments = sum(_bytes(v) for p in params for v in opt.state[p].values() if torch.is_tensor(v) and v.dim())
    return sum(_bytes(p) + _bytes(p.grad) for p in params) + moments


def _max(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


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
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    config = with_ep_device_groups(load_preset(args.preset), args.ep)  # as the trainer's plan resolves it
    parallel = init_parallel(args.ep, config.n_routed_experts, device)
    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    if args.wrapper == "fsdp":
        module = apply_fsdp(model, parallel, activation_checkpointing=args.checkpoint_blocks)
        clip = fsdp_clip
    else:
        module, clip = parallelize(model, parallel), ddp_clip
    autocast = (torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" and args.wrapper == "ddp"
                else nullcontext())
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1),
                          generator=torch.Generator().manual_seed(1))
    batch = local_batch(batch, parallel).to(device)
    state = [0]

    def step() -> None:
        with autocast:
            out = module(batch[:, :-1])
            loss = total_loss(out.logits, batch[:, 1:], out.router_outputs, model.config).total
        loss.backward()
        clip(model, 1.0, parallel)
        state[0] = _state_bytes(model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.repeats + 1):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(_max(time.perf_counter() - start, device))
    result = {"preset": args.preset, "processes": parallel.world_size, "dp": parallel.dp, "ep": parallel.ep,
              "wrapper": args.wrapper if parallel.is_distributed else "none",
              "checkpoint_blocks": args.checkpoint_blocks, "backend": dist.get_backend() if dist.is_initialized()
              else "none", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "step_ms": statistics.median(times) * 1e3, "state_MB": _max(state[0], device) / 2**20,
              "peak_MB": _max(_peak_mb(device), device)}
    if parallel.is_main:
        print(json.dumps(result) if args.json else
              "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    shutdown(parallel)


if __name__ == "__main__":
    main()
