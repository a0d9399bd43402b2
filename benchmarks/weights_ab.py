"""Batch-1 decode of the same weights held two ways, alternating in one process (weights read once first):

    python benchmarks/weights_ab.py copied:/work/q16/hf4 mapped:/work/q16/hf4     # bf16: in memory vs mapped
    python benchmarks/weights_ab.py ckpt:/work/q16/int4rows ckpt:/work/q16/int4   # int4 repacked vs mapped

`copied:HF_DIR` reads an HF directory whole into memory (convert.hf.read_hf_state), `mapped:HF_DIR` as
`generate` does (convert/hf_load.py: mapped, experts copied), `ckpt:PATH` loads any checkpoint as `generate` does.
Prints one JSON line: median decode tokens/s of each round, per model, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_16b import touch_weights  # noqa: E402


def load(spec: str):
    from deepseekmoe.convert.hf import read_hf_state
    from deepseekmoe.checkpoint import model_from_state
    from deepseekmoe.convert.hf_load import read_hf_state_mapped
    from deepseekmoe.inference.loading import load_for_inference
    from deepseekmoe.runtime import for_device

    kind, _, path = spec.partition(":")
    if kind == "ckpt":
        return load_for_inference(path, "cpu")[0]
    reader = {"copied": read_hf_state, "mapped": read_hf_state_mapped}[kind]
    model = model_from_state(*reader(path), torch.device("cpu"))
    for_device(model, torch.device("cpu"))
    return model


def decode_speed(model, new_tokens: int) -> float:
    """Median tokens/s of `new_tokens` greedy steps after an 8-token prompt."""
    from deepseekmoe.inference.generate import decode_one_token, prefill

    with torch.inference_mode():
        caches = model.new_kv_caches(1, 8 + new_tokens)
        token = prefill(model, torch.arange(1, 9)[None], caches).argmax(-1)
        steps = []
        for i in range(new_tokens):
            t = time.perf_counter()
            token = decode_one_token(model, token, 8 + i, caches).argmax(-1)
            steps.append(time.perf_counter() - t)
    return 1 / statistics.median(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    before = os.getloadavg()[0]
    models = {spec: load(spec) for spec in a.specs}
    for model in models.values():
        touch_weights(model)
    speeds: dict[str, list[float]] = {spec: [] for spec in models}
    for _ in range(a.rounds):
        for spec, model in models.items():
            speeds[spec].append(round(decode_speed(model, a.new_tokens), 3))
    print(json.dumps({"step": "weights-ab", "decode_tok_s_median": speeds,
                      "load_average": [round(before, 2), round(os.getloadavg()[0], 2)],
                      "machine": f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"}))


if __name__ == "__main__":
    main()
