"""The CPU runtime's settings side by side on the training step of benchmarks/train_step.py (forward, loss,
backward, clipping, AdamW, as `deepseekmoe train` runs it):

    python benchmarks/runtime_knobs.py keep-freed [--presets tiny-deepseekmoe,tiny-dense] [--rounds 3] [--steps 5]
                                              [--no-limit]
    python benchmarks/runtime_knobs.py mkl-cbwr [--presets tiny-deepseekmoe,tiny-dense] [--rounds 3] [--steps 5]
    python benchmarks/runtime_knobs.py thresholds [--presets tiny-deepseekmoe] [--steps 8]
    python benchmarks/runtime_knobs.py pieces [--presets tiny-deepseekmoe,small-deepseekmoe,16b-2l] [--steps 8]

* keep-freed: `keep_freed_memory` on and off (DEEPSEEKMOE_KEEP_FREED_MEMORY=0). It changes the whole process's
  allocator, so each side runs in a process of its own, alternating (on, off, on, off, ...): median step time over
  --steps steps after two warm-up steps, and the process's peak RSS; the table gives the medians over rounds.
  `16b-2l` is vs_transformers.py's 16B shape with two layers (batch 4 x 512, its training step); --no-limit lifts
  KEEP_FREED_MAX_PARAMETER_BYTES, which keeps such a model out otherwise.
* mkl-cbwr: MKL's strict conditional numerical reproducibility (MKL_CBWR=AUTO,STRICT, which `import deepseekmoe`
  sets unless MKL_CBWR is set) against MKL's default (MKL_CBWR empty), a process each, alternating, as keep-freed.
* thresholds: models with the runtime at different `min_expert_work` / `min_linear_work` in one process, stepping
  in alternating order (the same bits whichever runs where, so each model trains on).
* pieces: the AdamW step alone (the runtime's, runtime/optim.py) with parameters (over --cut-from) cut into pieces of
  PIECE_ELEMENTS and other sizes, against whole parameters a part (as before the pieces), on one model with random
  gradients (the update's speed does not depend on their values), alternating; median of --steps steps each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import machine  # noqa: E402
from train_step import build, make_step  # noqa: E402

from deepseekmoe import Transformer, load_preset  # noqa: E402
from deepseekmoe.runtime import cpu  # noqa: E402
from deepseekmoe.runtime.cpu import CpuRuntime  # noqa: E402


def one_process(preset: str, steps: int, no_limit: bool) -> dict:
    """Median step time of `steps` steps after two warm-up steps, and peak RSS, in this process."""
    if no_limit:
        cpu.KEEP_FREED_MAX_PARAMETER_BYTES = 1 << 62
    if preset == "16b-2l":
        from vs_transformers import build as build_side, preset_config, train_step
        cfg = preset_config(preset)
        model, runtime = build_side(cfg, "ours")
        ids = torch.randint(0, cfg.vocab_size, (4, 513), generator=torch.Generator().manual_seed(1))
        step, tokens = train_step(model, "ours", ids, runtime), 4 * 512
    else:
        model, opt = build(preset, "grouped")
        step, tokens = make_step(model, opt, 8, 256), 8 * 256
    step(), step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "tokens": tokens,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


ENV_KNOBS = {"keep-freed": ("DEEPSEEKMOE_KEEP_FREED_MEMORY", "1", "0"), "mkl-cbwr": ("MKL_CBWR", "AUTO,STRICT", "")}
"""knob: (environment variable, its value on, off); each side runs in processes of its own."""


def by_env(knob: str, presets: list[str], rounds: int, steps: int, no_limit: bool) -> None:
    var, on, off = ENV_KNOBS[knob]
    for preset in presets:
        got: dict[str, list[dict]] = {"on": [], "off": []}
        for _ in range(rounds):
            for side in ("on", "off"):
                env = {**os.environ, var: on if side == "on" else off}
                out = subprocess.run([sys.executable, __file__, "_one", preset, str(steps), str(int(no_limit))],
                                     env=env, check=True, capture_output=True, text=True).stdout
                got[side].append(json.loads(out.strip().splitlines()[-1]))
        med = {side: (statistics.median(r["step_s"] for r in rs), statistics.median(r["maxrss_mb"] for r in rs))
               for side, rs in got.items()}
        tokens = got["on"][0]["tokens"]
        print(f"{preset:<20} on {tokens / med['on'][0]:8.0f} tokens/s {med['on'][1]:8.0f} MB   "
              f"off {tokens / med['off'][0]:8.0f} tokens/s {med['off'][1]:8.0f} MB   "
              f"time on/off {med['on'][0] / med['off'][0]:.3f}", flush=True)


def thresholds(presets: list[str], steps: int) -> None:
    variants = {"experts 128 MB, linear 2^24": dict(min_expert_work=128 << 20, min_linear_work=1 << 24),
                "experts 16 MB, linear 2^24": dict(min_expert_work=16 << 20, min_linear_work=1 << 24),
                "experts 16 MB, linear 2^26": dict(min_expert_work=16 << 20, min_linear_work=1 << 26),
                "experts 16 MB, linear 2^27": dict(min_expert_work=16 << 20, min_linear_work=1 << 27)}
    for preset in presets:
        calls = {}
        for name, kw in variants.items():
            torch.manual_seed(0)
            model = Transformer(load_preset(preset))
            runtime = CpuRuntime.apply(model, **kw)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
            runtime.attach_optimizer(opt)
            calls[name] = make_step(model, opt, 8, 256)
            calls[name]()
        times: dict[str, list[float]] = {n: [] for n in calls}
        for r in range(steps):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            print(f"{preset:<20} {name:<28} {2048 / statistics.median(ts):8.0f} tokens/s", flush=True)


def pieces(presets: list[str], steps: int, cut_from: int = 0) -> None:
    """Every parameter over the piece size cut (cut_from 0), or those over `cut_from` elements."""
    from deepseekmoe.runtime import optim
    from vs_transformers import preset_config

    sizes = {"whole parameters": 1 << 62, "pieces of 2^16": 1 << 16, "pieces of 2^18": 1 << 18,
             "pieces of 2^20": 1 << 20}
    for preset in presets:
        torch.manual_seed(0)
        model = Transformer(preset_config(preset))
        runtime = CpuRuntime.apply(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        runtime.attach_optimizer(opt)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()  # the state made
        times: dict[str, list[float]] = {n: [] for n in sizes}
        for r in range(steps):
            for name in (list(sizes) if r % 2 == 0 else list(sizes)[::-1]):
                optim.PIECE_ELEMENTS, optim.CUT_FROM_ELEMENTS = sizes[name], cut_from
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)
        n = sum(p.numel() for p in model.parameters())
        base = statistics.median(times["whole parameters"])
        for name, ts in times.items():
            print(f"{preset:<20} {n / 1e6:7.1f}M parameters  {name:<18} {statistics.median(ts) * 1e3:9.1f} ms a step"
                  f"  time / whole {statistics.median(ts) / base:.3f}", flush=True)
        del model, opt, runtime


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_one":
        print(json.dumps(one_process(argv[1], int(argv[2]), argv[3] == "1")))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=[*ENV_KNOBS, "thresholds", "pieces"])
    p.add_argument("--presets", default="tiny-deepseekmoe,tiny-dense")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cut-from", type=int, default=0, help="pieces: cut only parameters over this many elements "
                   "(default 0: every parameter over the piece size; the runtime's is CUT_FROM_ELEMENTS)")
    p.add_argument("--no-limit", action="store_true", help="keep-freed: lift the 1 GB model limit on the 'on' side")
    a = p.parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in machine().items()), flush=True)
    presets = [s for s in a.presets.split(",") if s]
    if a.what in ENV_KNOBS:
        by_env(a.what, presets, a.rounds, a.steps, a.no_limit)
    elif a.what == "thresholds":
        thresholds(presets, a.steps)
    else:
        pieces(presets, a.steps, a.cut_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
