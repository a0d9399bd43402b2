"""End-to-end training-step throughput: tokens/s and MFU of a preset, `grouped` vs `loop` experts.

    python benchmarks/train_step.py [--presets tiny-deepseekmoe,small-deepseekmoe] [--batch 8] [--seq 256]
    deepseekmoe bench train-step [same options]

One step = forward, the full loss (LM + balance losses), backward, gradient clipping at 1.0 and an AdamW step, on
random token ids (throughput does not depend on the data). Each variant gets one warm-up step, then the variants
alternate step by step; the median step time gives tokens/s. MFU = training FLOPs per token (accounting.count:
6 x activated matmul parameters + attention) x tokens/s / peak, where peak is the measured fp32 throughput of a
large square matmul on this machine (reported as peak_gflops), an achievable peak rather than a datasheet one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import add_compete_option, competing_process, machine  # noqa: E402

from deepseekmoe import Transformer, load_preset  # noqa: E402
from deepseekmoe.errors import UserValueError  # noqa: E402
from deepseekmoe.runtime import for_device  # noqa: E402
from deepseekmoe.runtime.cpu import CpuRuntime  # noqa: E402
from deepseekmoe.accounting import count, estimate_mfu  # noqa: E402
from deepseekmoe.losses import total_loss  # noqa: E402


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n x n matmul (the achievable peak used for MFU)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


IMPLS = ("grouped", "grouped-inline", "grouped-workers", "loop")
"""grouped: as `deepseekmoe train` runs it (runtime.for_device: the CPU runtime where there are 2+ threads);
grouped-inline: no runtime, the experts in the calling thread; grouped-workers: the CPU runtime's workers on every
call, however small; loop: the reference."""


def build(preset: str, impl: str, seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    if impl not in IMPLS:
        raise UserValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")
    cfg = load_preset(preset)
    cfg.experts_impl = "loop" if impl == "loop" else "grouped"
    torch.manual_seed(seed)
    model = Transformer(cfg)
    runtime = None
    if impl == "grouped":
        runtime = for_device(model, "cpu")
    elif impl == "grouped-workers":
        runtime = CpuRuntime.apply(model, min_expert_work=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if runtime is not None:
        runtime.attach_optimizer(opt)  # as train does
    return model, opt


def make_step(model: Transformer, opt: torch.optim.Optimizer, batch: int, seq: int):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=gen)

    def step() -> float:
        out = model(ids[:, :-1])
        loss = total_loss(out.logits, ids[:, 1:], out.router_outputs, model.config).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step


def run(*, presets: str = "tiny-deepseekmoe,small-deepseekmoe", impls: str = "grouped,loop", batch: int = 8,
        seq: int = 256, repeats: int = 3, as_json: bool = False) -> int:
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if as_json else (lambda m: print(m, flush=True))
    info = machine()
    peak = matmul_peak_flops()
    info["peak_gflops"] = round(peak / 1e9, 1)
    log(" ".join(f"{k}={v}" for k, v in info.items()))
    rows = []
    for preset in [p.strip() for p in presets.split(",") if p.strip()]:
        variants = {impl: make_step(*build(preset, impl), batch, seq) for impl in impls.split(",")}
        times: dict[str, list[float]] = {n: [] for n in variants}
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            log(f"{preset} {name}: warm-up step {time.perf_counter() - t0:.2f} s")
        for _ in range(repeats):
            for name, step in variants.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        cfg = load_preset(preset)
        for name, ts in times.items():
            tps = batch * seq / statistics.median(ts)
            rows.append({"preset": preset, "experts_impl": name, "batch": batch, "seq": seq,
                         "step_s": statistics.median(ts), "tokens_per_s": tps,
                         "mfu": estimate_mfu(cfg, seq, tps, peak),
                         "flops_per_token": count(cfg, seq).flops_per_token})
    if as_json:
        print(json.dumps({"machine": info, "results": rows}, indent=1))
        return 0
    print(f"{'preset':<20} {'impl':<16} {'step s':>8} {'tokens/s':>10} {'MFU':>7}")
    for r in rows:
        print(f"{r['preset']:<20} {r['experts_impl']:<16} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['mfu']:>7.1%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny-deepseekmoe,small-deepseekmoe")
    p.add_argument("--impls", default="grouped,loop", help=f"comma-separated, from: {', '.join(IMPLS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="as_json", action="store_true")
    add_compete_option(p)
    args = vars(p.parse_args(argv))
    with competing_process(args.pop("compete")):
        return run(**args)


if __name__ == "__main__":
    sys.exit(main())
