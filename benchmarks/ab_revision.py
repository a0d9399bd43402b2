"""This checkout against an earlier git revision, side by side in one process: training step, decode, MoE layer.

    python benchmarks/ab_revision.py --baseline REV [--what train,decode,decode8,layer] [--presets tiny-deepseekmoe]
                                     [--rounds 6] [--compete]

The package as it was at REV is extracted (`git archive`) into a temporary directory and imported under another
name, so both versions run in the same process on the same machine state, alternating call by call (the order
rotates every round); the table reports medians and the median of same-round ratios (this / baseline).
Each side runs as its own commands run it: through its own `runtime.for_device` where it has one (revisions before
the CPU runtime chose their strategies inside the model).
--compete starts a second process for the whole run, a busy machine as users' are: 2-thread matmuls (`--compete`,
`--compete matmul`) or `while True: pass` (`--compete spin`).
--isolate runs each side in a process of its own (this, baseline, this, baseline, ... --rounds calls each), for
code that changes process-wide OpenMP state (revisions up to d261fef release the calling thread's OpenMP threads
before every experts call, which would also hit the other side in a shared process); the ratio is then of medians.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from moe_layer import SHAPES, add_compete_option, competing_process  # noqa: E402


def load_revision(rev: str, into: Path):
    """The deepseekmoe package at git revision `rev`, importable as `deepseekmoe_<rev>`."""
    name = "deepseekmoe_" + "".join(c if c.isalnum() else "_" for c in rev)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "deepseekmoe"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "deepseekmoe").rename(into / name)
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def _apply_runtime(pkg, model: "torch.nn.Module"):
    """The side's own `runtime.for_device` (revisions before the CPU runtime have none); the runtime or None."""
    try:
        runtime = importlib.import_module(pkg.__name__ + ".runtime")
    except ImportError:
        return None
    return runtime.for_device(model, "cpu")


def _prepare(pkg, preset: str, current: bool):
    torch.manual_seed(0)
    model = pkg.Transformer(pkg.load_preset(preset))
    return model, _apply_runtime(pkg, model)


def train_call(pkg, preset: str, current: bool, batch: int = 8, seq: int = 256):
    model, runtime = _prepare(pkg, preset, current)
    loss_fn = importlib.import_module(pkg.__name__ + ".losses").total_loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if hasattr(runtime, "attach_optimizer"):  # as the side's train does
        runtime.attach_optimizer(opt)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        out = model(ids[:, :-1])
        loss = loss_fn(out.logits, ids[:, 1:], out.router_outputs, model.config).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return batch * seq
    return step


def decode_call(pkg, preset: str, current: bool, prompt_len: int = 32, new_tokens: int = 64, batch: int = 1):
    model = _prepare(pkg, preset, current)[0].eval()
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(1))

    @torch.inference_mode()
    def decode() -> float:
        caches = model.new_kv_caches(batch, prompt_len + new_tokens)
        tok = model(prompt, 0, caches).logits[:, -1].argmax(-1, keepdim=True)
        for pos in range(prompt_len, prompt_len + new_tokens):
            tok = model(tok, pos, caches).logits[:, -1].argmax(-1, keepdim=True)
        return batch * new_tokens
    return decode


def decode8_call(pkg, preset: str, current: bool):
    """Decode at batch 8 (`--what decode8`)."""
    return decode_call(pkg, preset, current, batch=8)


def layer_call(pkg, shape: str, current: bool):
    """Forward + backward of one MoE block at a benchmarks/moe_layer.py shape (S1: T=4096, D=512, 64 x 128)."""
    s = SHAPES[shape]
    cfg = pkg.ModelConfig(hidden_size=s.hidden, n_routed_experts=s.experts, moe_intermediate_size=s.width,
                          n_shared_experts=s.shared, num_experts_per_tok=s.top_k)
    torch.manual_seed(0)
    moe = importlib.import_module(pkg.__name__ + ".model.moe").MoE(cfg)
    _apply_runtime(pkg, moe)
    x = torch.randn(1, s.tokens, s.hidden, generator=torch.Generator().manual_seed(1))

    def call() -> float:
        for p in moe.parameters():
            p.grad = None
        if s.mode == "train":
            moe(x.clone().requires_grad_())[0].sum().backward()
        else:
            with torch.no_grad():
                moe(x)
        return s.tokens
    return call


def _measure(calls: dict, rounds: int) -> tuple[dict[str, list[float]], float]:
    for c in calls.values():
        c()
    times: dict[str, list[float]] = {n: [] for n in calls}
    units = 0.0
    for r in range(rounds):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            t0 = time.perf_counter()
            units = calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times, units


def run(baseline: str, what: list[str], presets: list[str], shapes: list[str], rounds: int, isolate: bool,
        side: str | None = None) -> list[dict]:
    import deepseekmoe
    rows = []
    jobs = [(f"train {p}", train_call, p) for p in presets if "train" in what]
    jobs += [(f"decode {p}", decode_call, p) for p in presets if "decode" in what]
    jobs += [(f"decode8 {p}", decode8_call, p) for p in presets if "decode8" in what]
    jobs += [(f"layer {s}", layer_call, s) for s in shapes if "layer" in what]
    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(baseline, Path(tmp)) if side != "this" else None
        for label, make, arg in jobs:
            if side is not None:  # one side of an isolated run: print the call times for the parent
                pkg, current = (deepseekmoe, True) if side == "this" else (old, False)
                times, units = _measure({side: make(pkg, arg, current)}, rounds)
                print(json.dumps({"units": units, "times": times[side]}), flush=True)
                continue
            if isolate:
                times = {"this": [], baseline: []}
                for _ in range(2):
                    for name in ("this", baseline):
                        out = subprocess.run([sys.executable, __file__, "--baseline", baseline,
                                              "--side", "this" if name == "this" else "baseline",
                                              "--what", label.split()[0], "--presets", arg, "--shapes", arg,
                                              "--rounds", str(rounds)], check=True, capture_output=True, text=True)
                        got = json.loads(out.stdout.strip().splitlines()[-1])
                        times[name] += got["times"]
                        units = got["units"]
                ratio = statistics.median(times["this"]) / statistics.median(times[baseline])
            else:
                times, units = _measure({"this": make(deepseekmoe, arg, True), baseline: make(old, arg, False)},
                                        rounds)
                ratio = statistics.median(a / b for a, b in zip(times["this"], times[baseline]))
            row = {"what": label, "this_per_s": units / statistics.median(times["this"]),
                   "baseline_per_s": units / statistics.median(times[baseline]), "time_ratio": ratio}
            print(f"{label:<28} this {row['this_per_s']:>9.1f}/s  {baseline} {row['baseline_per_s']:>9.1f}/s  "
                  f"time this/baseline {ratio:.3f}", flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="git revision to compare against")
    p.add_argument("--what", default="train,decode,layer")
    p.add_argument("--presets", default="tiny-deepseekmoe")
    p.add_argument("--shapes", default="s1", help="moe_layer.py shapes for --what layer")
    p.add_argument("--rounds", type=int, default=6)
    add_compete_option(p)
    p.add_argument("--isolate", action="store_true", help="each side in a process of its own")
    p.add_argument("--side", choices=["this", "baseline"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side is not None:
        run(a.baseline, a.what.split(","), a.presets.split(","), a.shapes.split(","), a.rounds, False, a.side)
        return 0
    with competing_process(a.compete):
        run(a.baseline, a.what.split(","), a.presets.split(","), a.shapes.split(","), a.rounds, a.isolate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
