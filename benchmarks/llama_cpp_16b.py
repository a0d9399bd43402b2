"""llama.cpp Q8_0 against this project's int8 on the same DeepSeekMoE weights: batch-1 decode, one process.

    pip install llama-cpp-python        # optional; builds llama.cpp from source (no torch)
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    python benchmarks/quant_16b.py make /work/q16/hf4 --layers 4           # the 16B shape, 4 layers
    python benchmarks/quant_16b.py convert /work/q16/hf4 /work/q16/int8 --quantize int8
    python benchmarks/llama_cpp_16b.py gguf /work/q16/hf4 /work/q16/q8_0.gguf \\
        --convert-script llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py
    python benchmarks/llama_cpp_16b.py decode /work/q16/q8_0.gguf /work/q16/int8 --threads 2

`gguf` runs llama.cpp's own conversion script (DeepseekForCausalLM -> GGUF Q8_0: int8 in blocks of 32 with a
float16 scale each) on a view of the HF directory (links to its files) that adds a small SentencePiece
tokenizer.model, the vocabulary form that script takes without a list of known tokenizers (its vocabulary is padded
to the config's size; token ids are all the benchmark uses). `decode` loads both models in one process, reads their
weights once, and alternates rounds: the same prompt ids, then the same fixed ids one at a time through the KV
cache, timed per step; llama.cpp with `--threads` threads, ours as `generate` runs it with `--threads` intra-op
threads. llama.cpp runs without its repacked CPU weight buffers unless `--repack`: with them, its decode crashed
(segmentation fault in llama_decode) on this project's AVX-512/AMX machine. Each step prints one JSON line;
without llama_cpp (or the script) the steps say so and exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spm_model(out: Path, vocab_size: int = 400) -> None:
    """A small SentencePiece model trained on generated words, written to `out` (tokenizer.model)."""
    import io

    import sentencepiece as spm

    rng = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = [" ".join("".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=rng))
                      for n in torch.randint(2, 9, (12,), generator=rng)) for _ in range(2000)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size,
                                   model_type="bpe", minloglevel=2)
    out.write_bytes(buffer.getvalue())


def gguf(hf_dir: Path, out: Path, script: Path | None) -> dict:
    if script is None or not script.is_file():
        return {"step": "gguf", "skipped": "no llama.cpp convert_hf_to_gguf.py (--convert-script)"}
    view = out.with_suffix(".src")
    view.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "tokenizer.json" and not (view / f.name).exists():
            (view / f.name).symlink_to(f.resolve())
    spm_model(view / "tokenizer.model")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(script), str(view), "--outtype", "q8_0", "--outfile", str(out)], check=True)
    return {"step": "gguf", "out": str(out), "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 1)}


def _steps(forward, prompt: list[int], tokens: list[int]) -> tuple[float, list[float]]:
    """(prefill seconds, seconds per decode step) of forward(ids, position) over prompt, then tokens one by one."""
    t = time.perf_counter()
    forward(prompt, 0)
    prefill = time.perf_counter() - t
    steps = []
    for i, tok in enumerate(tokens):
        t = time.perf_counter()
        forward([tok], len(prompt) + i)
        steps.append(time.perf_counter() - t)
    return prefill, steps


def ours(ckpt: str, threads: int, n_ctx: int):
    from deepseekmoe.inference.generate import decode_one_token, prefill
    from deepseekmoe.inference.loading import load_for_inference
    from quant_16b import touch_weights

    torch.set_num_threads(threads)
    model = load_for_inference(ckpt, "cpu")[0]
    touch_weights(model)
    state = {}

    def forward(ids: list[int], pos: int) -> None:
        with torch.inference_mode():
            if pos == 0:
                state["caches"] = model.new_kv_caches(1, n_ctx)
                prefill(model, torch.tensor([ids]), state["caches"])
            else:
                decode_one_token(model, torch.tensor(ids), pos, state["caches"])
    return forward, model.config.vocab_size


def llama(path: str, threads: int, n_ctx: int, repack: bool):
    """llama.cpp on `path`; repack False: without its repacked CPU weight buffers (`use_extra_bufts`)."""
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = repack
        return p
    low.llama_model_default_params = params
    try:
        llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                    verbose=False)
    finally:
        low.llama_model_default_params = defaults
    llm.eval(list(range(1, 9)))  # the weights' pages read once, as ours are

    def forward(ids: list[int], pos: int) -> None:
        if pos == 0:
            llm.reset()
        llm.eval(ids)
    return forward, llm.n_vocab()


def decode(gguf_path: str, ckpt: str, threads: int, prompt_len: int, new_tokens: int, rounds: int,
           repack: bool = False) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"step": "decode", "skipped": "llama_cpp is not installed (pip install llama-cpp-python)"}
    n_ctx = prompt_len + new_tokens
    load = os.getloadavg()[0]
    engines = {"llama.cpp Q8_0": llama(gguf_path, threads, n_ctx, repack),
               "deepseekmoe int8": ours(ckpt, threads, n_ctx)}
    vocab = min(v for _, v in engines.values())
    ids = torch.randint(0, vocab, (n_ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    results: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in engines}
    for _ in range(rounds):
        for name, (forward, _) in engines.items():
            prefill_s, steps = _steps(forward, ids[:prompt_len], ids[prompt_len:])
            results[name]["prefill"].append(prompt_len / prefill_s)
            results[name]["decode"].append(1 / statistics.median(steps[1:]))
    summary = {name: {"prefill_tok_s": [round(v, 2) for v in r["prefill"]],
                      "decode_tok_s_median": [round(v, 2) for v in r["decode"]]} for name, r in results.items()}
    a, b = (statistics.median(results[k]["decode"]) for k in engines)
    return {"step": "decode", "threads": threads, "llama_cpp_repack": repack, "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            **summary, "ours_over_llama_cpp": round(b / a, 3),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    g = sub.add_parser("gguf")
    g.add_argument("hf_dir", type=Path)
    g.add_argument("out", type=Path)
    g.add_argument("--convert-script", type=Path, default=os.environ.get("LLAMA_CPP_CONVERT"))
    d = sub.add_parser("decode")
    d.add_argument("gguf")
    d.add_argument("ckpt")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--prompt-len", type=int, default=32)
    d.add_argument("--new-tokens", type=int, default=16)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--repack", action="store_true",
                   help="llama.cpp with its repacked CPU weight buffers (its default; crashed on AVX-512/AMX here)")
    a = p.parse_args()
    if a.step == "gguf":
        result = gguf(a.hf_dir, a.out, a.convert_script)
    else:
        result = decode(a.gguf, a.ckpt, a.threads, a.prompt_len, a.new_tokens, a.rounds, a.repack)
    result["machine"] = f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
