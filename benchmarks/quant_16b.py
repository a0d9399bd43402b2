"""DeepSeekMoE-16B at full size on a CPU box: a random-weight checkpoint in the official layout, int8 conversion,
loading, prefill and decode, against this machine's memory bandwidth.

    python benchmarks/quant_16b.py make /work/big16/hf            # random bf16 HF directory, written streamed
    python benchmarks/quant_16b.py bandwidth                       # read bandwidth of this machine (GB/s)
    python benchmarks/quant_16b.py convert /work/big16/hf /work/big16/int8 --quantize int8
    python benchmarks/quant_16b.py convert /work/big16/hf /work/big16/int4 --quantize int4 [--int4-layout rows]
    python benchmarks/quant_16b.py run /work/big16/int8            # load + prefill + decode, batch 1
    python benchmarks/quant_16b.py run /work/big16/hf --quantize int8
    python benchmarks/quant_16b.py decode-ab /work/big16/int8      # the quantized runtime against the float one
    python benchmarks/quant_16b.py run random --device cuda        # bf16 16B built on the GPU (gpu_16b.sh)

`convert` and `run` run the real commands' code in a child process while the parent samples its memory from
/proc every 50 ms: peak RSS, and the anonymous part of it (RssAnon: what cannot be dropped; the rest is pages of
memory-mapped weight files, which the kernel can reclaim and read again). `--layers N` on `make` writes the 16B
shape with fewer layers (for quick checks). Every step prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseekmoe.convert.hf_layout import INDEX_FILE, hf_layout  # noqa: E402
from deepseekmoe.convert.hf_export import plan_shards  # noqa: E402
from deepseekmoe.convert.hf_files import hf_config_dict  # noqa: E402
from deepseekmoe.convert.stream import SafetensorsWriter  # noqa: E402
from deepseekmoe.presets import load_preset  # noqa: E402

SHARD_BYTES = 4 << 30


def make(out: Path, layers: int | None, seed: int) -> dict:
    """A random bf16 HF directory of the 16B config (N(0, 0.02), norms 1), one tensor in memory at a time."""
    config = load_preset("deepseekmoe-16b")
    if layers:
        config = type(config)(**{**config.to_dict(), "num_hidden_layers": layers})
    layout = hf_layout(config)
    out.mkdir(parents=True, exist_ok=False)
    shards = plan_shards([(k, math.prod(s) * 2) for k, s in layout.items()], SHARD_BYTES)
    generator = torch.Generator().manual_seed(seed)
    weight_map, t0 = {}, time.perf_counter()
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(out / name, {k: (torch.bfloat16, layout[k]) for k in keys},
                               metadata={"format": "pt"}) as writer:
            for k in keys:
                shape = layout[k]
                t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02)
                writer.write(k, t.to(torch.bfloat16))
        weight_map.update({k: name for k in keys})
        print(f"wrote {name}", file=sys.stderr, flush=True)
    total = sum(math.prod(s) * 2 for s in layout.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf_config_dict(config, torch.bfloat16, None), indent=2))
    _tokenizer(config.vocab_size).save(str(out / "tokenizer.json"))
    return {"step": "make", "out": str(out), "bytes": total, "seconds": round(time.perf_counter() - t0, 1)}


def _tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary ("t0" ... "tN"), so every generated id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def bandwidth(gib: float = 2.0, repeats: int = 5) -> dict:
    """Read bandwidth (GB/s, best of `repeats`) summing a buffer far larger than the last-level cache, with the
    process's intra-op threads (the decode's setting), and copy bandwidth (read + write bytes) for reference."""
    a = torch.ones(int(gib * (1 << 30)) // 4)
    b = torch.empty_like(a)
    read, copy = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        read.append(a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        copy.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    return {"step": "bandwidth", "threads": torch.get_num_threads(), "buffer_gib": gib,
            "read_gb_s": round(max(read), 2), "copy_gb_s": round(max(copy), 2)}


class MemorySampler(threading.Thread):
    """Peak VmRSS / RssAnon / RssFile (bytes) of a process, sampled from /proc every `period` seconds."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.period, self.peak = pid, period, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            except OSError:
                return
            time.sleep(self.period)


def sampled(args: list[str]) -> dict:
    """Run this script's child step in a subprocess; its JSON line plus peak memory (GB) and wall seconds."""
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    sampler = MemorySampler(child.pid)
    sampler.start()
    out, _ = child.communicate()
    sampler.done.set()
    if child.returncode:
        raise SystemExit(f"child step {args} failed with {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update({f"peak_{k}_gb": round(v / 1e9, 2) for k, v in sampler.peak.items()},
                  wall_s=round(time.perf_counter() - t0, 1))
    return result


def child_convert(src: str, out: str, fmt: str, int4_layout: str | None = None) -> dict:
    from deepseekmoe.convert.quantize import convert_quantized

    t0 = time.perf_counter()
    convert_quantized(src, out, fmt, int4_layout=int4_layout)
    size = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    return {"step": "convert", "src": src, "out": out, "format": fmt, "seconds": round(time.perf_counter() - t0, 1),
            "out_bytes": size}


def activated_bytes(model) -> int:
    """Weight bytes one decoded token reads: every matrix of attention, dense FFNs, shared experts, router and LM
    head, K of the E routed experts of each MoE layer, one embedding row."""
    from deepseekmoe.model.experts import RoutedExperts

    total, c = 0, model.config
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            per_expert = m.gate_up_proj[0].nbytes + m.down_proj[0].nbytes
            total += per_expert * c.num_experts_per_tok
        elif hasattr(m, "weight") and not isinstance(m, torch.nn.Embedding):  # linears, router, norms
            total += m.weight.nbytes
    return total + model.embed_tokens.weight[0].nbytes


def random_model(device: str, layers: int | None = None):
    """The 16B (or its shape with fewer layers) with random bf16 weights built straight on `device`, no files."""
    from deepseekmoe.model import Transformer
    from deepseekmoe.runtime import for_device

    config = load_preset("deepseekmoe-16b")
    if layers:
        config = type(config)(**{**config.to_dict(), "num_hidden_layers": layers})
    with torch.device("meta"):
        model = Transformer(config).to(torch.bfloat16)  # no float32 copy ever exists
    model.to_empty(device=device)
    model.init_weights()
    for_device(model, device)
    return model.eval()


def _sync(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def touch_weights(model) -> float:
    """Read every weight once (pages of a memory-mapped file come in from disk): seconds taken."""
    from deepseekmoe.model.experts import RoutedExperts

    t = time.perf_counter()
    for m in model.modules():
        weights = [m.gate_up_proj, m.down_proj] if isinstance(m, RoutedExperts) else [getattr(m, "weight", None)]
        for w in weights:
            data = getattr(w, "data", w)
            if isinstance(data, torch.Tensor):
                data.view(-1)[::4096].sum()  # one byte per page
    return time.perf_counter() - t


def child_run(path: str, quantize: str | None, prompt_len: int, new_tokens: int, device: str = "cpu",
              warm: bool = False) -> dict:
    from deepseekmoe.inference.generate import decode_one_token, prefill
    from deepseekmoe.inference.loading import load_for_inference
    from deepseekmoe.runtime import describe

    t0 = time.perf_counter()
    model = random_model(device) if path == "random" else load_for_inference(path, device, quantize)[0]
    load_s = _sync(device) - t0
    warm_s = touch_weights(model) if warm else None
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        caches = model.new_kv_caches(1, prompt_len + new_tokens)
        t = _sync(device)
        token = prefill(model, prompt.to(device), caches).argmax(-1)
        prefill_s = _sync(device) - t
        steps = []
        for i in range(new_tokens):
            t = _sync(device)
            token = decode_one_token(model, token, prompt_len + i, caches).argmax(-1)
            steps.append(_sync(device) - t)
    decode = sorted(steps[1:])  # the first decode step still faults weight pages in
    gpu = ({"cuda_max_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "gpu": torch.cuda.get_device_name()} if device.startswith("cuda") else {})
    return {"step": "run", "path": path, "quantize": quantize, "device": device, **gpu,
            "experts": describe(model, device, model.embed_tokens.weight.dtype), "threads": torch.get_num_threads(),
            "load_s": round(load_s, 1), "touch_weights_s": warm_s and round(warm_s, 1), "prefill_tokens": prompt_len,
            "prefill_tok_s": round(prompt_len / prefill_s, 2), "first_decode_s": round(steps[0], 2),
            "decode_tok_s_median": round(1 / decode[len(decode) // 2], 3), "decode_tok_s_best": round(1 / decode[0], 3),
            "activated_bytes_per_token": activated_bytes(model)}


def decode_ab(path: str, new_tokens: int, rounds: int) -> dict:
    """Decode tokens/s of a quantized model as `for_device` runs it (caller 1 thread, workers) against the float
    model's runtime settings (caller with every intra-op thread, experts on the workers only from
    MIN_WEIGHT_BYTES), alternating in one process, weights read once first."""
    from deepseekmoe.inference.generate import decode_one_token, prefill
    from deepseekmoe.inference.loading import load_for_inference
    from deepseekmoe.runtime.cpu import MIN_WEIGHT_BYTES, CpuRuntime

    model, _, _ = load_for_inference(path, "cpu")
    touch_weights(model)
    runtimes = {"quantized runtime": {}, "float runtime": {"min_weight_bytes": MIN_WEIGHT_BYTES, "caller_threads": None}}
    speeds: dict[str, list[float]] = {k: [] for k in runtimes}
    for _ in range(rounds):
        for name, settings in runtimes.items():
            CpuRuntime.remove(model)
            runtime = CpuRuntime.apply(model, torch.get_num_threads() if settings else None, **settings)
            with torch.inference_mode():
                caches = model.new_kv_caches(1, 8 + new_tokens)
                token = prefill(model, torch.arange(1, 9)[None], caches).argmax(-1)
                t = time.perf_counter()
                for i in range(new_tokens):
                    token = decode_one_token(model, token, 8 + i, caches).argmax(-1)
                speeds[name].append(new_tokens / (time.perf_counter() - t))
            runtime.close()
    return {"step": "decode-ab", "path": path, **{k: [round(v, 3) for v in vs] for k, vs in speeds.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    m = sub.add_parser("make")
    m.add_argument("out", type=Path)
    m.add_argument("--layers", type=int)
    m.add_argument("--seed", type=int, default=0)
    sub.add_parser("bandwidth")
    ab = sub.add_parser("decode-ab")
    ab.add_argument("path")
    ab.add_argument("--new-tokens", type=int, default=6)
    ab.add_argument("--rounds", type=int, default=2)
    c = sub.add_parser("convert")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--quantize", default="int8")
    c.add_argument("--int4-layout", help="int4 bytes in this layout (model/int4_layout.py; default: the kernel's)")
    r = sub.add_parser("run")
    r.add_argument("path")
    r.add_argument("--quantize")
    r.add_argument("--prompt-len", type=int, default=32)
    r.add_argument("--new-tokens", type=int, default=12)
    r.add_argument("--device", default="cpu")
    r.add_argument("--warm", action="store_true", help="read every weight once before timing (steady state)")
    for q in (c, r):
        q.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step == "make":
        result = make(a.out, a.layers, a.seed)
    elif a.step == "bandwidth":
        result = bandwidth()
    elif a.step == "decode-ab":
        result = decode_ab(a.path, a.new_tokens, a.rounds)
    elif a.step == "convert":
        layout = ["--int4-layout", a.int4_layout] if a.int4_layout else []
        result = (child_convert(a.src, a.out, a.quantize, a.int4_layout) if a.child
                  else sampled(["convert", a.src, a.out, "--quantize", a.quantize, *layout, "--child"]))
    else:
        extra = ["--quantize", a.quantize] if a.quantize else []
        extra += ["--warm"] if a.warm else []
        result = (child_run(a.path, a.quantize, a.prompt_len, a.new_tokens, a.device, a.warm) if a.child
                  else sampled(["run", a.path, *extra, "--prompt-len", str(a.prompt_len),
                                "--new-tokens", str(a.new_tokens), "--device", a.device, "--child"]))
    result["machine"] = f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
