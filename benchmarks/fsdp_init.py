"""Start-up memory of `train --fsdp` under torchrun: per-rank peak RSS while the model is built and laid out.

    torchrun --nproc-per-node N benchmarks/fsdp_init.py --build meta|full [--preset small-deepseekmoe] [--ep E]

--build meta is what the trainer does (`FullySharded.build`: the model on the meta device, EP + fully_shard, then
only this rank's shards materialised and initialised); --build full is the whole model built and initialised on
every rank, then laid out (`ParallelPlan.build`, what every plan without FSDP does). gloo on CPU, one thread per
process; one build per launch, so each peak is its own. Rank 0 prints, per rank: the RSS before the build (the
Python/torch runtime and the process group), the peak RSS after it (ru_maxrss), and the state held (parameters).
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
import torch.distributed as dist

from deepseekmoe import load_preset
from deepseekmoe.distributed import shutdown
from deepseekmoe.distributed.fsdp import local_tensor
from deepseekmoe.distributed.plan import ParallelPlan, resolve_plan
from deepseekmoe.train.config import RunConfig, TrainConfig


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _per_rank(value: float) -> list[float]:
    values = [0.0] * dist.get_world_size()
    dist.all_gather_object(values, round(value))
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", choices=("meta", "full"), default="meta")
    ap.add_argument("--preset", default="small-deepseekmoe")
    ap.add_argument("--ep", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    cfg = TrainConfig(fsdp=True, batch_size=8, device="cpu")
    run, plan = resolve_plan(RunConfig(preset=args.preset, model=load_preset(args.preset), train=cfg), args.ep,
                             device)
    before = _rss_mb()
    torch.manual_seed(0)
    build = plan.build if args.build == "meta" else lambda config: ParallelPlan.build(plan, config)
    model, _ = build(run.model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    held = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters()) / 2**20
    result = {"preset": args.preset, "build": args.build, "dp": plan.parallel.dp, "ep": plan.parallel.ep,
              "rss_before_MB": _per_rank(before), "peak_MB": _per_rank(peak), "params_MB": _per_rank(held)}
    if plan.parallel.is_main:
        print(json.dumps(result))
    shutdown(plan.parallel)


if __name__ == "__main__":
    main()
