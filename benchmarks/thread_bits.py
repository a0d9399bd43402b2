"""Which operations of a training step give other bits at another intra-op thread count.

    python benchmarks/thread_bits.py [--presets tiny-deepseekmoe,tiny-dense] [--threads 2,1] [--steps 2] [--json]

Runs forward, loss, backward, clipping and AdamW of a preset (no CPU runtime) at the first thread count; every
aten operation that does not write into its inputs is run again at the second count on the same inputs, and its
outputs are compared bit for bit. Prints the operations whose outputs differed, with their input shapes and how
often, and the hash of the weights after the steps when the whole run is made at each count.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import machine  # noqa: E402
from train_step import make_step  # noqa: E402

from deepseekmoe import Transformer, load_preset  # noqa: E402

RANDOM = ("aten.empty", "aten.rand", "aten.normal", "aten.uniform", "aten.bernoulli")


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class Recheck(TorchDispatchMode):
    """Runs each pure operation again at `other` threads and counts those whose floating outputs differ."""

    def __init__(self, threads: int, other: int) -> None:
        super().__init__()
        self.threads, self.other = threads, other
        self.differ: collections.Counter = collections.Counter()
        self.checked = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._schema.is_mutable or str(func).startswith(RANDOM):
            return out
        torch.set_num_threads(self.other)
        try:
            again = func(*args, **kwargs)
        finally:
            torch.set_num_threads(self.threads)
        self.checked += 1
        if any(a.is_floating_point() and not torch.equal(a, b) for a, b in zip(_tensors(out), _tensors(again))):
            self.differ[(str(func), str([tuple(t.shape) for t in _tensors(args)][:3]))] += 1
        return out


def train(preset: str, threads: int, steps: int, mode: Recheck | None = None) -> str:
    """`steps` training steps at `threads` intra-op threads; the hash of the weights after them."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(load_preset(preset))
    step = make_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch=8, seq=256)
    for _ in range(steps):
        with mode if mode is not None else contextlib.nullcontext():
            step()
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    return digest.hexdigest()[:16]


def run(presets: list[str], threads: tuple[int, int], steps: int) -> list[dict]:
    rows = []
    for preset in presets:
        mode = Recheck(*threads)
        train(preset, threads[0], steps, mode)
        rows.append({"preset": preset, "checked_ops": mode.checked,
                     "differing": [{"op": op, "inputs": shapes, "calls": n}
                                   for (op, shapes), n in mode.differ.most_common()],
                     "weights": {str(t): train(preset, t, steps) for t in threads}})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny-deepseekmoe,tiny-dense")
    p.add_argument("--threads", default="2,1", help="two intra-op thread counts: run at the first, recheck at the "
                   "second")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", dest="as_json", action="store_true")
    a = p.parse_args(argv)
    first, second = (int(t) for t in a.threads.split(","))
    rows = run(a.presets.split(","), (first, second), a.steps)
    if a.as_json:
        print(json.dumps({"machine": machine(), "results": rows}, indent=1))
        return 0
    for r in rows:
        print(f"{r['preset']}: {r['checked_ops']} operations rechecked; weights after {a.steps} steps "
              + ", ".join(f"{t} threads {h}" for t, h in r["weights"].items()))
        for d in r["differing"]:
            print(f"  differs: {d['op']} {d['inputs']} x{d['calls']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
