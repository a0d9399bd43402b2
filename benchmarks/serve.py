"""Serving throughput under concurrency: N clients at once over HTTP, batched engine vs one request at a time.

Both contenders are the same server (`deepseekmoe.inference.server`) on loopback with the same model and requests;
only `max_batch_size` differs (1 = sequential decoding). Requests are greedy with a fixed max_tokens so both do the
same work. Reports completion tokens per second over the wall time of all requests, median over repeats.

    python benchmarks/serve.py --preset tiny-deepseekmoe --clients 8 --max-tokens 32 [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import threading
import time
from datetime import date

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseekmoe import Transformer, load_preset
from deepseekmoe.inference.engine import Engine
from deepseekmoe.inference.server import Api, make_server

PROMPTS = ["def main():", "import os", "class Parser:", "The module", "for i in range(", "return self.",
           "# Copyright", "if __name__"]


def _tokenizer(vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = " ".join(PROMPTS) * 50
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _round(port: int, clients: int, max_tokens: int) -> tuple[float, int]:
    done: list[int] = []

    def call(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        done.append(json.loads(conn.getresponse().read())["usage"]["completion_tokens"])
        conn.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-deepseekmoe")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = _tokenizer(512)
    cfg = load_preset(args.preset).replace(vocab_size=tok.get_vocab_size(), eos_token_id=None, bos_token_id=0)
    model = Transformer(cfg).eval()
    servers = {}
    for name, batch in (("sequential (max_batch_size=1)", 1), (f"batched (max_batch_size={args.clients})",
                                                                 args.clients)):
        engine = Engine(model, tok, max_batch_size=batch, batch_window_s=0.02)
        srv = make_server(Api(engine, args.preset, 1024, 256), "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers[name] = (srv, engine)
    rates: dict[str, list[float]] = {name: [] for name in servers}
    _round(next(iter(servers.values()))[0].server_address[1], 1, 4)  # warm-up
    for _ in range(args.repeats):
        for name, (srv, _) in servers.items():  # interleaved
            seconds, tokens = _round(srv.server_address[1], args.clients, args.max_tokens)
            rates[name].append(tokens / seconds)
    results = {name: statistics.median(r) for name, r in rates.items()}
    for srv, engine in servers.values():
        srv.shutdown()
        engine.close()
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "date": date.today().isoformat()},
              "preset": args.preset, "clients": args.clients, "max_tokens": args.max_tokens,
              "tokens_per_s": results}
    if args.json:
        print(json.dumps(report))
        return
    base = next(iter(results.values()))
    print(f"{args.preset}, {args.clients} concurrent clients x {args.max_tokens} tokens (median of {args.repeats})")
    for name, rate in results.items():
        print(f"  {name:<32} {rate:8.1f} tokens/s  ({rate / base:.2f}x)")


if __name__ == "__main__":
    main()
