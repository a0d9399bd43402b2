"""Weight-only matmul kernels at the 16B's shapes, side by side in one process: torch's int8 and int4 CPU kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, as model/quantized.py calls them), the dequantize-then-matmul
baseline, the bf16 matmul of the float weight, and torchao's int8 weight-only linear where torchao is installed.

    python benchmarks/quant_kernels.py [--rows 1,6,32,128] [--threads 1] [--json]

Cold weights: each contender cycles through copies of its weight totalling at least 1 GB (more than the
last-level cache), as in a model whose other layers evict a weight before its next use. Rounds rotate the
contenders; the median per call is reported, with its weight bytes per second (GB/s) and its time relative to
the bf16 matmul of the same round (x_bf16).
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseekmoe.model.quantized import QuantizedWeight, dequantize, quantize, quantized_linear  # noqa: E402

SHAPES = {"expert gate_up": (2816, 2048), "expert down": (2048, 1408), "attention q": (2048, 2048),
          "shared down": (2048, 2816), "lm_head": (102400, 2048)}
POOL_BYTES = 1 << 30


def _torchao_int8(w: torch.Tensor, copies: int) -> list | None:
    """`copies` bf16 linears of w quantized by torchao's int8 weight-only config, or None without torchao."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    layers = []
    for _ in range(copies):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(w)
        quantize_(linear, Int8WeightOnlyConfig())
        layers.append(linear)
    return layers


def _contenders(o: int, i: int, copies: int) -> dict:
    """name -> (list of per-copy callables taking x, weight bytes read per call)."""
    w = torch.randn(o, i) * 0.02
    q8, s8 = quantize(w, "int8")
    q4, s4 = quantize(w, "int4", 128)
    w8 = [QuantizedWeight.from_stored(q8.clone(), s8, torch.bfloat16) for _ in range(copies)]
    w4 = [QuantizedWeight.from_stored(q4, s4, torch.bfloat16) for _ in range(copies)]
    wb = [w.to(torch.bfloat16) for _ in range(copies)]
    ao = _torchao_int8(w, copies)
    optional = {"torchao int8 weight-only": (ao, w8[0].nbytes)} if ao else {}
    return {**optional,
        "bf16 matmul": ([lambda x, b=b: F.linear(x, b) for b in wb], wb[0].nbytes),
        "int8 kernel": ([lambda x, q=q: torch.ops.aten._weight_int8pack_mm(x, q.data, q.scales) for q in w8],
                        w8[0].nbytes),
        "int8 dequantize+matmul": ([lambda x, q=q: F.linear(x, q.data.to(x.dtype) * q.scales[:, None]) for q in w8],
                                   w8[0].nbytes),
        "int8 matmul then scale": ([lambda x, q=q: F.linear(x, q.data.to(x.dtype)) * q.scales for q in w8],
                                   w8[0].nbytes),
        "int8 as run (quantized_linear)": ([lambda x, q=q: quantized_linear(x, q) for q in w8], w8[0].nbytes),
        "int4 kernel": ([lambda x, q=q: quantized_linear(x, q) for q in w4], w4[0].nbytes),
        "int4 dequantize+matmul": ([lambda x: F.linear(x, dequantize(q4, s4, "int4", torch.bfloat16))],
                                   q4.nbytes + s4.nbytes),
    }


def bench_shape(name: str, rows: list[int], rounds: int) -> list[dict]:
    o, i = SHAPES[name]
    copies = max(1, POOL_BYTES // (o * i * 2))
    contenders = _contenders(o, i, copies)
    out = []
    for n in rows:
        x = torch.randn(n, i).to(torch.bfloat16)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        ratio: dict[str, list[float]] = {k: [] for k in contenders}
        for r in range(rounds + 1):  # round 0 warms up
            got = {}
            for k, (fns, _) in contenders.items():
                fn = fns[r % len(fns)]
                t = time.perf_counter()
                fn(x)
                got[k] = time.perf_counter() - t
            if r:
                for k, v in got.items():
                    times[k].append(v)
                    ratio[k].append(v / got["bf16 matmul"])
        for k, (_, nbytes) in contenders.items():
            med = statistics.median(times[k])
            out.append({"shape": name, "weight": [o, i], "rows": n, "kernel": k, "ms": round(med * 1e3, 3),
                        "weight_gb_s": round(nbytes / med / 1e9, 2),
                        "x_bf16": round(statistics.median(ratio[k]), 2)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,6,32,128")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", dest="as_json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [int(n) for n in a.rows.split(",")]
    results = [r for s in a.shapes.split(",") for r in bench_shape(s, rows, a.rounds)]
    machine = {"cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.as_json:
        print(json.dumps({"machine": machine, "results": results}))
        return
    print(machine)
    for r in results:
        print(f"{r['shape']:>15} {r['rows']:>4} rows  {r['kernel']:<31} {r['ms']:>9.3f} ms  "
              f"{r['weight_gb_s']:>6.2f} GB/s  x_bf16 {r['x_bf16']:.2f}")


if __name__ == "__main__":
    main()
