"""Expert-parallel all-to-all overhead on 2 processes (gloo on CPU, NCCL when 2 GPUs are visible).

    python benchmarks/all_to_all.py [--tokens 256,1024,4096] [--hidden 128] [--experts 64] [--width 32]
                                    [--top-k 6] [--repeats 20] [--compare-wrappers] [--json]

For each token count T (tokens per process), both processes at once, 1 thread each on CPU:
  * exchange  one all_to_all of the T*K dispatched rows (fp32, D wide) with the split sizes of uniform random
              routing (about half the rows stay on the sending rank): time and the bandwidth of the rows that
              cross to the other process;
  * local     the single-device MoE layer (all E experts, no communication) on the process's T tokens, forward +
              backward: what each process would do if it held every expert;
  * ep=2      the same layer with its experts split over the 2 processes (ExpertParallelExperts): counts
              exchange + dispatch + combine forward, the mirror exchanges in backward;
  * overhead  ep=2 - local: the cost of expert parallelism at this size (the compute per process is the same on
              average: each process runs T*K expert rows either way).
Times are the median over --repeats of the slower process (barrier before each call).
--compare-wrappers times a data-parallel training step (forward, backward, AdamW) of tiny-deepseekmoe over the
2 processes with DistributedDataParallel and with FSDP2 fully_shard (per block, then the root).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepseekmoe import MoE, ModelConfig, Transformer, load_preset
from deepseekmoe.distributed import all_to_all
from deepseekmoe.distributed.expert_parallel import ExpertParallelExperts
from deepseekmoe.losses import total_loss


def _timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of the slower rank."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return statistics.median(times)


def _layer_case(args: argparse.Namespace, tokens: int, device: torch.device) -> dict:
    rank = dist.get_rank()
    config = ModelConfig(hidden_size=args.hidden, n_routed_experts=args.experts, moe_intermediate_size=args.width,
                         num_experts_per_tok=args.top_k, n_shared_experts=0, vocab_size=64)
    torch.manual_seed(0)
    local = MoE(config).to(device)
    for p in local.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    ep = MoE(config).to(device)
    ep.load_state_dict(local.state_dict())
    ep.experts = ExpertParallelExperts(ep.experts, dist.group.WORLD)
    x = torch.randn(1, tokens, args.hidden, device=device, generator=None).requires_grad_(True)

    def step(moe: MoE) -> None:
        y, _ = moe(x)
        y.sum().backward()
        x.grad = None
        for p in moe.parameters():
            p.grad = None

    rows = tokens * args.top_k
    stay = torch.rand(rows, generator=torch.Generator().manual_seed(rank)) < 0.5
    send = [int(stay.sum()), rows - int(stay.sum())] if rank == 0 else [rows - int(stay.sum()), int(stay.sum())]
    recv = torch.tensor(send, device=device)
    dist.all_to_all_single(recv, torch.tensor(send, device=device))
    recv_list = recv.tolist()
    x_rows = torch.randn(rows, args.hidden, device=device)
    exchange = _timed(lambda: all_to_all(x_rows, recv_list, send, dist.group.WORLD), args.repeats, device)
    crossing = send[1 - rank] * args.hidden * 4
    t_local = _timed(lambda: step(local), args.repeats, device)
    t_ep = _timed(lambda: step(ep), args.repeats, device)
    return {"tokens": tokens, "rows": rows, "exchange_ms": exchange * 1e3,
            "exchange_GBps": crossing / exchange / 1e9, "local_ms": t_local * 1e3, "ep2_ms": t_ep * 1e3,
            "overhead_ms": (t_ep - t_local) * 1e3, "overhead_pct": 100 * (t_ep - t_local) / t_local}


def _wrapper_case(args: argparse.Namespace, wrapper: str, device: torch.device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    config = load_preset("tiny-deepseekmoe")
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    if wrapper == "ddp":
        module = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        module = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (args.batch // 2, args.seq_len + 1),
                          generator=torch.Generator().manual_seed(dist.get_rank())).to(device)

    def step() -> None:
        out = module(batch[:, :-1])
        total_loss(out.logits, batch[:, 1:], out.router_outputs, config).total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _timed(step, args.repeats, device)
    return {"wrapper": wrapper, "step_ms": seconds * 1e3, "tokens_per_s": args.batch * args.seq_len / seconds}


def _worker(rank: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_cuda = torch.cuda.device_count() >= 2
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=2)
    results: dict = {"device": "2 x " + (torch.cuda.get_device_name(device) if use_cuda else "CPU process"),
                     "backend": dist.get_backend(), "threads": args.threads, "layers": [], "wrappers": []}
    for tokens in args.tokens:
        results["layers"].append(_layer_case(args, tokens, device))
        if rank == 0:
            print(f"  tokens {tokens}: done", flush=True)
    if args.compare_wrappers:
        results["wrappers"] = [_wrapper_case(args, w, device) for w in ("ddp", "fsdp2")]
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def _print(results: dict, args: argparse.Namespace) -> None:
    print(f"{results['device']}, {results['backend']}, {results['threads']} thread(s) each; MoE layer D={args.hidden}"
          f" E={args.experts} F={args.width} K={args.top_k}, forward + backward, median of {args.repeats}")
    print(f"{'tokens/proc':>11} {'rows':>6} {'a2a ms':>8} {'a2a GB/s':>9} {'local ms':>9} {'ep=2 ms':>8} "
          f"{'overhead':>14}")
    for r in results["layers"]:
        print(f"{r['tokens']:>11} {r['rows']:>6} {r['exchange_ms']:>8.3f} {r['exchange_GBps']:>9.2f} "
              f"{r['local_ms']:>9.2f} {r['ep2_ms']:>8.2f} {r['overhead_ms']:>7.2f} ms {r['overhead_pct']:>3.0f}%")
    for w in results["wrappers"]:
        print(f"data parallel step (tiny-deepseekmoe, {args.batch}x{args.seq_len} global): {w['wrapper']:>5} "
              f"{w['step_ms']:.1f} ms ({w['tokens_per_s']:,.0f} tokens/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[256, 1024, 4096])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-wrappers", action="store_true")
    parser.add_argument("--batch", type=int, default=8, help="global batch for --compare-wrappers")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length for --compare-wrappers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(port, args, out), nprocs=2)
        results = json.loads(Path(out).read_text())
    print(json.dumps(results)) if args.json else _print(results, args)


if __name__ == "__main__":
    main()
