"""The transformers model (the standalone code every export carries, also what `import deepseekmoe.hf` registers)
against our `Transformer` on the same weights: forward and forward + backward time of a preset.

    python benchmarks/hf_model.py [--presets tiny-deepseekmoe,small-deepseekmoe] [--batch 4] [--seq 256]

Contenders: `hf` (DeepseekForCausalLM loaded from an export of the model, sdpa attention, per-expert nn.Linear
experts after a sorted dispatch) and `ours` (our Transformer with `grouped` experts in the calling thread, which is
what the registered transformers class ran before it became the standalone code). Rounds alternate between the
contenders; the ratio column is the median over rounds of hf time / ours time within one round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import machine  # noqa: E402

from deepseekmoe import Transformer, load_preset  # noqa: E402
from deepseekmoe.convert.hf_export import convert_to_hf  # noqa: E402
from deepseekmoe.checkpoint import save_model  # noqa: E402


def contenders(preset: str, root: Path) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    import deepseekmoe.hf  # noqa: F401

    torch.manual_seed(0)
    ours = Transformer(load_preset(preset))
    save_model(ours, root / "ckpt")
    convert_to_hf(root / "ckpt", root / "hf")
    return {"hf": AutoModelForCausalLM.from_pretrained(root / "hf"), "ours": ours}


def step(model: torch.nn.Module, ids: torch.Tensor, train: bool) -> float:
    """Seconds for one forward (inference mode) or forward + backward of the summed logits (train mode)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    if train:
        model(ids).logits.float().mean().backward()
    else:
        with torch.inference_mode():
            model(ids)
    return time.perf_counter() - t0


def measure(models: dict[str, torch.nn.Module], ids: torch.Tensor, train: bool, rounds: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        step(model, ids, train)  # warm-up
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(step(models[name], ids, train))
    ratio = statistics.median(h / o for h, o in zip(times["hf"], times["ours"]))
    return {**{f"{n}_ms": round(1e3 * statistics.median(t), 2) for n, t in times.items()},
            "hf_over_ours": round(ratio, 3)}


def run(*, presets: str, batch: int, seq: int, rounds: int, as_json: bool) -> int:
    info = machine()
    rows = []
    for preset in [p for p in presets.split(",") if p]:
        with tempfile.TemporaryDirectory() as tmp:
            models = contenders(preset, Path(tmp))
        vocab = models["ours"].config.vocab_size
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (models["hf"].eval()(ids).logits - models["ours"].eval()(ids).logits).abs().max().item()
        for train in (False, True):
            rows.append({"preset": preset, "mode": "train" if train else "forward", "batch": batch, "seq": seq,
                         **measure(models, ids, train, rounds), "max_abs_logit_diff": diff})
    if as_json:
        print(json.dumps({"machine": info, "results": rows}))
    else:
        print(" ".join(f"{k}={v}" for k, v in info.items()))
        for row in rows:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny-deepseekmoe,small-deepseekmoe")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    return run(presets=a.presets, batch=a.batch, seq=a.seq, rounds=a.rounds, as_json=a.json)


if __name__ == "__main__":
    sys.exit(main())
