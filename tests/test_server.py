"""The OpenAI-compatible server, exercised by a real HTTP client over loopback."""

import http.client
import json
import threading

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.inference.engine import Engine
from deepseekmoe.inference.generate import encode_prompt, generate
from deepseekmoe.inference.server import Api, make_server, render_chat

TEXT = "the quick brown fox jumps over the lazy dog. " * 20 + "héllo wörld — ünïcode. " * 10


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.3,
                      bos_token_id=tok.token_to_id("<|bos|>"), eos_token_id=tok.token_to_id("<|eos|>"))
    model = Transformer(cfg).eval()
    engine = Engine(model, tok, max_batch_size=8, batch_window_s=0.3)
    srv = make_server(Api(engine, "tiny", max_tokens_limit=32, max_prompt_tokens=64), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, model, tok, engine
    srv.shutdown()
    srv.server_close()
    engine.close()


def _post(srv, path, body, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    return resp.status, data


def _expected(model, tok, prompt, n):
    ids = encode_prompt(tok, prompt, model.config.bos_token_id)
    out = generate(model, ids, n, temperature=0, eos_token_id=model.config.eos_token_id)
    out = [t for t in out if t != model.config.eos_token_id]
    return tok.decode(out)


def test_health_and_models(server):
    srv = server[0]
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok"}
    conn.request("GET", "/v1/models")
    assert json.loads(conn.getresponse().read())["data"][0]["id"] == "tiny"


def test_greedy_completion_equals_generate(server):
    srv, model, tok, _ = server
    status, data = _post(srv, "/v1/completions", {"prompt": "the quick", "max_tokens": 12, "temperature": 0})
    assert status == 200
    out = json.loads(data)
    assert out["choices"][0]["text"] == _expected(model, tok, "the quick", 12)
    assert out["usage"]["prompt_tokens"] == len(encode_prompt(tok, "the quick", model.config.bos_token_id))


def test_stream_concatenates_to_the_full_answer(server):
    srv, model, tok, _ = server
    status, data = _post(srv, "/v1/completions",
                         {"prompt": "héllo", "max_tokens": 10, "temperature": 0, "stream": True})
    assert status == 200
    events = [line[6:] for line in data.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == _expected(model, tok, "héllo", 10)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completion_and_stream(server):
    srv, model, tok, _ = server
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fox?"}]
    prompt = render_chat(msgs)
    assert prompt == "Be brief.\n\nUser: fox?\n\nAssistant:"
    status, data = _post(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "temperature": 0})
    assert status == 200
    msg = json.loads(data)["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": _expected(model, tok, prompt, 8)}
    _, data = _post(srv, "/v1/chat/completions",
                    {"messages": msgs, "max_tokens": 8, "temperature": 0, "stream": True})
    chunks = [json.loads(x[6:]) for x in data.split("\n\n") if x.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    assert chunks[0]["object"] == "chat.completion.chunk"


def test_concurrent_requests_are_batched_and_each_exact(server):
    srv, model, tok, engine = server
    prompts = ["the", "the lazy dog", "über", "jumps over the"]
    results: dict[str, str] = {}
    before = engine.max_batch_seen

    def call(p):
        _, data = _post(srv, "/v1/completions", {"prompt": p, "max_tokens": 9, "temperature": 0})
        results[p] = json.loads(data)["choices"][0]["text"]

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.max_batch_seen >= max(before, 2)
    for p in prompts:
        assert results[p] == _expected(model, tok, p, 9), p


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "max_tokens": 33}, 400, "max_tokens"),
    ({"prompt": "fox " * 80}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"messages": []}, 400, "messages"),
])
def test_bad_requests_get_clear_4xx(server, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    code, data = _post(server[0], path, body)
    assert code == status
    err = json.loads(data)["error"]
    assert err["param"] == param and err["message"]


def test_invalid_json_and_unknown_route(server):
    code, data = _post(server[0], "/v1/completions", None, raw="{not json")
    assert code == 400 and "JSON" in json.loads(data)["error"]["message"]
    code, _ = _post(server[0], "/v1/nothing", {})
    assert code == 404
