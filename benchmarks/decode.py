"""Decode throughput: tokens/s of greedy KV-cache decoding of a preset, `grouped` vs `loop` experts.

    python benchmarks/decode.py [--presets tiny-deepseekmoe,small-deepseekmoe] [--batch 1] [--new-tokens 64]
                                [--decode-paths on|off|both]
    deepseekmoe bench decode [same options]

`--decode-paths both` runs every variant twice, with the model's decode paths (model/layers.py: fused projections,
the routed experts' few-rows form, ...) and without them ("plain": the modules' training-time ops), alternating in
one process; "ratio" is plain time / decode-paths time, the median of the same-round ratios.

A random prompt of --prompt-len tokens is prefilled (not timed), then --new-tokens tokens are decoded one step at
a time under torch.inference_mode(); tokens/s = batch x new tokens / decode time, median over --repeats runs that
alternate between the variants. Random-init weights: the speed does not depend on what the model says.
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
from moe_layer import machine  # noqa: E402

from deepseekmoe import Transformer, load_preset  # noqa: E402
from deepseekmoe.errors import UserValueError  # noqa: E402
from deepseekmoe.runtime import for_device  # noqa: E402


def make_decode(preset: str, impl: str, batch: int, prompt_len: int, new_tokens: int, decode_paths: bool = True):
    """impl: grouped (as `deepseekmoe generate` runs it: runtime.for_device, the CPU runtime where there are 2+
    threads), grouped-inline (no runtime: plain matmuls in the calling thread), loop (the reference)."""
    if impl not in ("grouped", "grouped-inline", "loop"):
        raise UserValueError(f"unknown impl {impl!r}; expected grouped, grouped-inline or loop")
    cfg = load_preset(preset)
    cfg.experts_impl = "loop" if impl == "loop" else "grouped"
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.use_decode_paths(decode_paths)
    if impl == "grouped":
        for_device(model, "cpu")
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))

    @torch.inference_mode()
    def decode() -> float:
        caches = model.new_kv_caches(batch, prompt_len + new_tokens)
        tok = model(prompt, 0, caches).logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for pos in range(prompt_len, prompt_len + new_tokens):
            tok = model(tok, pos, caches).logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0
    return decode


def run(*, presets: str = "tiny-deepseekmoe,small-deepseekmoe", impls: str = "grouped,loop", batch: int = 1,
        prompt_len: int = 32, new_tokens: int = 64, repeats: int = 3, decode_paths: str = "on",
        as_json: bool = False) -> int:
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if as_json else (lambda m: print(m, flush=True))
    info = machine()
    log(" ".join(f"{k}={v}" for k, v in info.items()))
    rows = []
    for preset in [p.strip() for p in presets.split(",") if p.strip()]:
        variants = {f"{i} (plain)" if not on else i: make_decode(preset, i, batch, prompt_len, new_tokens, on)
                    for i in impls.split(",") for on in _decode_paths(decode_paths)}
        for fn in variants.values():
            fn()
        times: dict[str, list[float]] = {n: [] for n in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                times[name].append(fn())
        for name, ts in times.items():
            rows.append({"preset": preset, "experts_impl": name, "batch": batch, "prompt_len": prompt_len,
                         "new_tokens": new_tokens, "decode_s": statistics.median(ts),
                         "tokens_per_s": batch * new_tokens / statistics.median(ts),
                         "ratio": _ratio(times, name)})
    if as_json:
        print(json.dumps({"machine": info, "results": rows}, indent=1))
        return 0
    print(f"{'preset':<20} {'impl':<22} {'batch':>5} {'tokens/s':>10} {'ratio':>6}")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['preset']:<20} {r['experts_impl']:<22} {r['batch']:>5} {r['tokens_per_s']:>10.1f} {ratio:>6}")
    return 0


def _decode_paths(setting: str) -> list[bool]:
    if setting not in ("on", "off", "both"):
        raise UserValueError(f"--decode-paths={setting!r}: expected on, off or both")
    return {"on": [True], "off": [False], "both": [True, False]}[setting]


def _ratio(times: dict[str, list[float]], name: str) -> float | None:
    """For a variant with a plain twin: plain time / this time, the median of the same-round ratios."""
    plain = times.get(f"{name} (plain)")
    return None if plain is None else statistics.median(p / t for p, t in zip(plain, times[name]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny-deepseekmoe,small-deepseekmoe")
    p.add_argument("--impls", default="grouped,loop", help="comma-separated, from: grouped, grouped-inline, loop")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-paths", default="on", help="on, off (plain modules) or both (A/B, alternating)")
    p.add_argument("--json", dest="as_json", action="store_true")
    return run(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
