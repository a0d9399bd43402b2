"""Serving under concurrency, this checkout's server against an earlier revision's, side by side in one process.

    python benchmarks/serve.py [--baseline 95c959d] [--preset tiny-deepseekmoe] [--clients 1,8,32]
                               [--max-tokens 32] [--rounds 5] [--json]

Both servers listen on loopback at once with the same weights (each revision builds its own model from the same
preset and seed, wrapped by its own CPU runtime, as `deepseekmoe serve` does) and the same `max_batch_size` (the
serve default, 8). The baseline package is extracted with `git archive` (benchmarks/ab_revision.py) and imported
under another name. Rounds alternate between the servers (the order flips every round).

  * concurrency: C clients at once, each one greedy completion of --max-tokens tokens over plain HTTP (the model
    has no eos, so every request does the same work); completion tokens/s over the wall time of the round (median
    over rounds; the ratio is the median of same-round ratios, this / baseline, robust to a machine whose load
    drifts), and
    p50 / p99 of the per-request latency over all rounds, and how many requests failed (a refused or reset
    connection; the baseline's standard-library server listens with a backlog of 5);
  * behind long ones: 4 streaming requests of --long-tokens tokens start, and 0.3 s later a 2-token streaming
    request follows; its time to first token and its latency (a static-batch server holds it until the batch ends).
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import deepseekmoe
from ab_revision import load_revision
from deepseekmoe.inference.engine import Engine
from deepseekmoe.inference.routes import make_app
from deepseekmoe.inference.server import OpenAIServer, Settings, bind
from deepseekmoe.runtime import for_device

PROMPTS = ["def main():", "import os", "class Parser:", "The module", "for i in range(", "return self.",
           "# Copyright", "if __name__"]


def tokenizer(vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(PROMPTS) * 50], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def build_model(pkg, preset: str, vocab: int, runtime) -> torch.nn.Module:
    torch.manual_seed(0)
    model = pkg.Transformer(pkg.load_preset(preset).replace(vocab_size=vocab, eos_token_id=None, bos_token_id=0))
    runtime(model.eval(), "cpu")
    return model


def start_new(model, tok, batch: int) -> tuple[int, callable]:
    engine = Engine(model, tok, max_batch_size=batch)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(make_app(OpenAIServer(engine, Settings("m", 400))),
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def close() -> None:
        server.should_exit = True
        thread.join()
        engine.close()
    return sock.getsockname()[1], close


def start_old(pkg, model, tok, batch: int) -> tuple[int, callable]:
    engine = importlib.import_module(pkg.__name__ + ".inference.engine").Engine(model, tok, max_batch_size=batch)
    old = importlib.import_module(pkg.__name__ + ".inference.server")
    srv = old.make_server(old.Api(engine, "m", 400, 100), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close() -> None:
        srv.shutdown()
        engine.close()
    return srv.server_address[1], close


def request(port: int, prompt: str, max_tokens: int, stream: bool = False) -> tuple[float, float]:
    """(latency, time to first text) of one greedy completion, in seconds."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    if not stream:
        json.loads(resp.read())
    else:
        for line in resp:
            if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter() - start
            if line.startswith(b"data: [DONE]"):
                break
    conn.close()
    latency = time.perf_counter() - start
    return latency, first if first is not None else latency


def concurrency_round(port: int, clients: int, max_tokens: int) -> tuple[float, list[float], int]:
    """(completion tokens/s of the requests answered, their latencies, how many failed)."""
    latencies: list[float] = []
    failed: list[BaseException] = []

    def call(i: int) -> None:
        try:
            latencies.append(request(port, PROMPTS[i % len(PROMPTS)], max_tokens)[0])
        except OSError as exc:  # a refused or reset connection: counted, not retried
            failed.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) * max_tokens / (time.perf_counter() - start), latencies, len(failed)


def behind_long_round(port: int, long_tokens: int) -> tuple[float, float]:
    threads = [threading.Thread(target=request, args=(port, p, long_tokens, True)) for p in PROMPTS[:4]]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the long requests are decoding
    latency, ttft = request(port, "import os", 2, stream=True)
    for t in threads:
        t.join()
    return ttft, latency


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(servers: dict[str, int], args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {name: {"concurrency": {}, "behind_long": {}} for name in servers}
    order = list(servers)
    for c in args.clients:
        rates: dict[str, list[float]] = {n: [] for n in servers}
        lats: dict[str, list[float]] = {n: [] for n in servers}
        failed = dict.fromkeys(servers, 0)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                rate, lat, bad = concurrency_round(servers[name], c, args.max_tokens)
                rates[name].append(rate)
                lats[name].extend(lat)
                failed[name] += bad
        for name in servers:
            ratios = [a / b for a, b in zip(rates[name], rates[order[0]])]
            out[name]["concurrency"][c] = {"tokens_per_s": statistics.median(rates[name]),
                                           "ratio_to_baseline": statistics.median(ratios),
                                           "p50_s": percentile(lats[name], 0.5), "p99_s": percentile(lats[name], 0.99),
                                           "failed": failed[name], "requests": c * args.rounds}
    for name in servers:
        ttft, lat = zip(*[behind_long_round(servers[name], args.long_tokens) for _ in range(args.rounds)])
        out[name]["behind_long"] = {"ttft_s": statistics.median(ttft), "latency_s": statistics.median(lat)}
    return out


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    old, new = results["baseline"], results["this"]
    print(f"{args.preset}, max_batch_size 8, {args.max_tokens} tokens per request, median of {args.rounds} rounds")
    print("| clients | baseline tok/s | this tok/s | ratio | baseline p50 / p99 | this p50 / p99 | failed (base / this) |")
    print("|---|---|---|---|---|---|---|")
    for c in args.clients:
        o, n = old["concurrency"][c], new["concurrency"][c]
        print(f"| {c} | {o['tokens_per_s']:.1f} | {n['tokens_per_s']:.1f} | {n['ratio_to_baseline']:.2f}x"
              f" | {o['p50_s']:.2f} / {o['p99_s']:.2f} s | {n['p50_s']:.2f} / {n['p99_s']:.2f} s"
              f" | {o['failed']} / {n['failed']} of {o['requests']} |")
    o, n = old["behind_long"], new["behind_long"]
    print(f"2-token request behind 4 x {args.long_tokens}: time to first token {o['ttft_s']:.3f} s -> "
          f"{n['ttft_s']:.3f} s, latency {o['latency_s']:.3f} s -> {n['latency_s']:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="95c959d")
    ap.add_argument("--preset", default="tiny-deepseekmoe")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tok = tokenizer(512)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = load_revision(args.baseline, Path(tmp))
        old_runtime = importlib.import_module(pkg.__name__ + ".runtime").for_device
        old_model = build_model(pkg, args.preset, tok.get_vocab_size(), old_runtime)
        new_model = build_model(deepseekmoe, args.preset, tok.get_vocab_size(), for_device)
        ports, closers = {}, []
        for name, (port, close) in (("baseline", start_old(pkg, old_model, tok, 8)),
                                    ("this", start_new(new_model, tok, 8))):
            ports[name] = port
            closers.append(close)
        for port in ports.values():
            request(port, "warm up", 4)
        results = measure(ports, args)
        for close in closers:
            close()
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": os.getloadavg(), "baseline": args.baseline, "preset": args.preset}
    if args.json:
        print(json.dumps({"machine": meta, "results": results}))
    else:
        print(meta)
        report(results, args)


if __name__ == "__main__":
    main()
