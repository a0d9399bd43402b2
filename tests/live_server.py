"""A live server for the serving tests: a random tiny model behind uvicorn on a free loopback port, the `openai`
client pointed at it, and the references its outputs are checked against (plain full forwards, no KV cache)."""

from __future__ import annotations

import http.client
import json
import threading
import time

import openai
import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.inference.engine import Engine
from deepseekmoe.inference.routes import make_app
from deepseekmoe.inference.server import OpenAIServer, Settings, bind

TEXT = "the quick brown fox jumps over the lazy dog. " * 20 + "héllo wörld — ünïcode. " * 10


def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def tiny_model(tok: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.3,
                      bos_token_id=tok.token_to_id("<|bos|>"), eos_token_id=tok.token_to_id("<|eos|>"))
    return Transformer(cfg).eval()


class Live:
    """A uvicorn server in a thread on a free loopback port; `client` is an openai.OpenAI pointed at it."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.api = engine, OpenAIServer(engine, settings)
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(make_app(self.api), log_config=None, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()

    def post(self, path: str, body: dict | None, raw: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body=raw if raw is not None else json.dumps(body), headers=headers or {})
        resp = conn.getresponse()
        data = resp.read().decode()
        conn.close()
        return resp.status, json.loads(data) if data.startswith(("{", "[")) else data

    def get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()


@pytest.fixture(scope="module")
def live():
    tok = tokenizer()
    model = tiny_model(tok)
    server = Live(Engine(model, tok, max_batch_size=8), Settings("tiny", 64))
    yield server
    server.close()


def ids_of(live, text: str) -> list[int]:
    return [live.api.bos] + live.api.tokenizer.encode(text, add_special_tokens=False).ids


def reference(model, ids: list[int], n: int, adjust=None) -> list[int]:
    """Greedy continuation by full forwards (no cache); `adjust(logits, generated)` edits the logits first."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            if adjust is not None:
                logits = adjust(logits, out)
            out.append(int(logits.argmax()))
            if out[-1] == model.config.eos_token_id:
                break
    return out


def greedy(live, prompt, n: int = 10, **kw):
    return live.client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, **kw)
