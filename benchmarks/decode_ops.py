"""Where a decode step's operations go: aten ops per generated token, by module, from the torch profiler.

    python benchmarks/decode_ops.py [--presets tiny-deepseekmoe,tiny-dense] [--batch 1,8] [--steps 10]
                                    [--decode-paths on|off]

The model is built as benchmarks/decode.py builds it (random weights, `runtime.for_device`), a random prompt is
prefilled, and --steps greedy decode steps (model forward + argmax, as `generate_tokens` runs them) are profiled,
with the model's decode paths (model/layers.py) or, `--decode-paths off`, the plain modules. Every aten op, nested
ones included (F.linear's mm and its transpose view count as two), is charged to the innermost module scope it ran
in: attention (projections, rotary, KV cache, SDPA), norm (RMSNorm), router, routed experts, shared experts, dense
FFN, LM head, embedding, block (the residual adds), model (rotary tables, the layers' glue) and loop (what runs
outside the model: argmax, the token's reshape). Ops per token = ops per step / batch; the op-time share comes from
the profiler's self CPU time (noisy on a busy machine; the counts are exact).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch import nn
from torch.autograd.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import machine  # noqa: E402

from deepseekmoe import Transformer, load_preset  # noqa: E402
from deepseekmoe.model.attention import Attention  # noqa: E402
from deepseekmoe.model.experts import RoutedExperts  # noqa: E402
from deepseekmoe.model.layers import FeedForward, RMSNorm  # noqa: E402
from deepseekmoe.model.moe import MoE  # noqa: E402
from deepseekmoe.model.transformer import Block  # noqa: E402
from deepseekmoe.runtime import for_device  # noqa: E402

SCOPES = ("attention", "norm", "router", "routed experts", "shared experts", "dense FFN", "LM head", "embedding",
          "block", "model", "loop")


def scope_of(name: str, module: nn.Module, model: Transformer) -> str | None:
    """The scope a module's ops are charged to (None: its ops go to the scope it runs in)."""
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, RMSNorm):
        return "norm"
    if isinstance(module, RoutedExperts):
        return "routed experts"
    if isinstance(module, FeedForward):
        return "shared experts" if name.endswith("shared_experts") else "dense FFN"
    if isinstance(module, MoE):
        return "router"  # the gate, and the MoE's own glue (reshape, shared + routed add)
    if isinstance(module, Block):
        return "block"
    if module is model.lm_head:
        return "LM head"
    if module is model.embed_tokens:
        return "embedding"
    return "model" if module is model else None


def label_modules(model: Transformer) -> list:
    """Forward hooks that open a profiler scope `dsm::<scope>` around each labelled module; returns the handles."""
    handles, stack = [], []

    def enter(scope: str):
        def pre(*_):
            stack.append(record_function(f"dsm::{scope}"))
            stack[-1].__enter__()
        return pre

    def leave(*_):
        stack.pop().__exit__(None, None, None)
    for name, module in model.named_modules():
        scope = scope_of(name, module, model)
        if scope is not None:
            handles.append(module.register_forward_pre_hook(enter(scope)))
            handles.append(module.register_forward_hook(leave))
    return handles


def profile_decode(preset: str, batch: int, steps: int, decode_paths: bool = True, prompt_len: int = 32):
    """(ops per step by scope, self CPU microseconds per step by scope, op names per step) over `steps` steps."""
    cfg = load_preset(preset)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.use_decode_paths(decode_paths)
    for_device(model, "cpu")
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        caches = model.new_kv_caches(batch, prompt_len + steps + 2)
        tok = model(prompt, 0, caches).logits[:, -1].argmax(-1, keepdim=True)
        tok = model(tok, prompt_len, caches).logits[:, -1].argmax(-1, keepdim=True)  # warm-up step
        handles = label_modules(model)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for pos in range(prompt_len + 1, prompt_len + 1 + steps):
                with record_function("dsm::loop"):
                    tok = model(tok, pos, caches).logits[:, -1].argmax(-1, keepdim=True)
    for h in handles:
        h.remove()
    return charge(prof.events(), steps)


def charge(events, steps: int):
    counts, times = collections.Counter(), collections.Counter()
    names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for ev in events:
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("dsm::"):
            parent = parent.cpu_parent
        scope = parent.name[5:] if parent is not None else "loop"
        counts[scope] += 1
        times[scope] += ev.self_cpu_time_total
        names[scope][ev.name[6:]] += 1
    return counts, times, names


def report(preset: str, batch: int, steps: int, top: int, decode_paths: bool) -> None:
    counts, times, names = profile_decode(preset, batch, steps, decode_paths)
    total, total_t = sum(counts.values()) / steps, sum(times.values())
    print(f"\n{preset}, batch {batch}: {total:.0f} aten ops a step, {total / batch:.0f} a token "
          f"(self CPU {total_t / steps / 1e3:.2f} ms a step)")
    print(f"  {'scope':<16} {'ops/step':>9} {'ops/token':>10} {'time share':>10}  most frequent ops a step")
    for scope in SCOPES:
        if counts.get(scope):
            frequent = ", ".join(f"{n} {c / steps:.0f}" for n, c in names[scope].most_common(top))
            print(f"  {scope:<16} {counts[scope] / steps:>9.0f} {counts[scope] / steps / batch:>10.1f} "
                  f"{times[scope] / total_t:>10.1%}  {frequent}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny-deepseekmoe,tiny-dense")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--decode-paths", default="on", choices=["on", "off"])
    p.add_argument("--top", type=int, default=8, help="op names listed per scope")
    args = p.parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in machine().items()))
    for preset in args.presets.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            report(preset.strip(), batch, args.steps, args.top, args.decode_paths == "on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
