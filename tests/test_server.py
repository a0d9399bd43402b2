"""The OpenAI-compatible server, exercised by the real `openai` client against a live uvicorn server on loopback.

Every output is checked against an independent computation on the same random tiny model: plain full forwards
(no KV cache) for greedy tokens, log-probabilities and the penalties' effect, and single-request generation.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.data.chat import render_chat
from deepseekmoe.inference.engine import Engine
from deepseekmoe.inference.routes import make_app
from deepseekmoe.inference.server import OpenAIServer, Settings, bind

openai = pytest.importorskip("openai")

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


def test_models_retrieve_and_unknown_model(live):
    assert [m.id for m in live.client.models.list().data] == ["tiny"]
    assert live.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        live.client.models.retrieve("other")
    with pytest.raises(openai.NotFoundError) as err:
        live.client.completions.create(model="other", prompt="x")
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    assert live.get("/health") == (200, '{"status":"ok"}')


def test_prompt_forms_give_the_greedy_reference(live):
    model, tok = live.engine.model, live.api.tokenizer
    want = {p: tok.decode(reference(model, ids_of(live, p), 10)) for p in ("the quick", "héllo")}
    assert greedy(live, "the quick").choices[0].text == want["the quick"]
    out = greedy(live, ["the quick", "héllo"])
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [want["the quick"], want["héllo"]]
    token_ids = ids_of(live, "héllo")[1:]
    assert greedy(live, token_ids).choices[0].text == want["héllo"]
    both = greedy(live, [ids_of(live, "the quick")[1:], token_ids])
    assert [c.text for c in both.choices] == [want["the quick"], want["héllo"]]
    assert out.usage.prompt_tokens == len(ids_of(live, "the quick")) + len(ids_of(live, "héllo"))


def test_echo_logprobs_equal_the_models_log_softmax(live):
    model = live.engine.model
    out = greedy(live, "the quick brown", 6, echo=True, logprobs=3)
    choice = choice0 = out.choices[0]
    prompt_ids = ids_of(live, "the quick brown")
    gen = reference(model, prompt_ids, 6)
    assert choice.text.startswith("the quick brown")
    with torch.no_grad():
        lp = model(torch.tensor([prompt_ids + gen])).logits[0].float().log_softmax(-1)
    targets = (prompt_ids + gen)[1:]
    want = lp[torch.arange(len(targets)), torch.tensor(targets)]
    got = choice0.logprobs.token_logprobs
    assert len(got) == len(targets)
    assert torch.allclose(torch.tensor(got), want, atol=1e-4)
    for row, top in zip(lp, choice.logprobs.top_logprobs):
        best = row.topk(3).values
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best.tolist(), abs=1e-4)


def test_n_seed_and_best_of(live):
    kw = dict(model="tiny", prompt="the", max_tokens=8, temperature=1.0, seed=7)
    three = live.client.completions.create(n=3, logprobs=0, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2] and len({c.text for c in three.choices}) > 1
    assert [c.text for c in live.client.completions.create(n=3, **kw).choices] == [c.text for c in three.choices]
    score = {c.text: sum(c.logprobs.token_logprobs) for c in three.choices}
    best = live.client.completions.create(n=1, best_of=3, **kw)
    assert [c.text for c in best.choices] == [max(score, key=score.get)]
    assert three.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in three.choices)


@pytest.mark.parametrize("params,adjust", [
    ({"frequency_penalty": 2.0}, lambda lg, out: lg - 2.0 * torch.bincount(torch.tensor(out, dtype=torch.long),
                                                                           minlength=lg.shape[0])),
    ({"presence_penalty": 1.5}, lambda lg, out: lg - 1.5 * (torch.bincount(torch.tensor(out, dtype=torch.long),
                                                                            minlength=lg.shape[0]) > 0)),
    ({"logit_bias": {"40": 3.0, "41": -100}}, lambda lg, out: lg + torch.nn.functional.one_hot(
        torch.tensor(40), lg.shape[0]) * 3.0 - torch.nn.functional.one_hot(torch.tensor(41), lg.shape[0]) * 100),
])
def test_penalties_and_logit_bias_follow_their_definition(live, params, adjust):
    model, tok = live.engine.model, live.api.tokenizer
    ids = ids_of(live, "the the the")
    plain = reference(model, ids, 16)
    want = reference(model, ids, 16, adjust)
    assert want != plain  # the setting matters for this prompt
    out = greedy(live, "the the the", 16, extra_body=params) if "logit_bias" not in params else \
        greedy(live, "the the the", 16, **params)
    assert out.choices[0].text == tok.decode(want)


def test_repetition_penalty(live):
    model, tok = live.engine.model, live.api.tokenizer
    ids = ids_of(live, "the lazy dog")

    def adjust(lg, out):
        seen = torch.tensor(sorted(set(ids + out)))
        lg = lg.clone()
        lg[seen] = torch.where(lg[seen] > 0, lg[seen] / 1.8, lg[seen] * 1.8)
        return lg

    want = reference(model, ids, 16, adjust)
    assert want != reference(model, ids, 16)
    out = greedy(live, "the lazy dog", 16, extra_body={"repetition_penalty": 1.8})
    assert out.choices[0].text == tok.decode(want)


def test_stop_strings_stop_tokens_eos_and_min_tokens(live):
    tok, eos = live.api.tokenizer, live.api.eos
    gen = reference(live.engine.model, ids_of(live, "the quick"), 10)
    full = tok.decode(gen)
    stop = next(tok.decode([t]) for t in gen[2:] if tok.decode([t]).strip() and "\ufffd" not in tok.decode([t]))
    out = greedy(live, "the quick", stop=[stop]).choices[0]
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop"
    spanning = full[len(tok.decode(gen[:2])) - 1:len(tok.decode(gen[:4]))]  # over several tokens
    cut = greedy(live, "the quick", stop=[spanning]).choices[0].text
    streamed = greedy(live, "the quick", stop=[spanning], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut == full[:full.index(spanning)]
    out = greedy(live, "the quick", extra_body={"stop_token_ids": [gen[3]]}).choices[0]
    assert out.text == tok.decode(gen[:gen.index(gen[3])]) and out.finish_reason == "stop"
    force_eos = {str(eos): 100}
    out = greedy(live, "the quick", logit_bias=force_eos)
    assert (out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens) == ("", "stop", 1)
    out = greedy(live, "the quick", 5, logit_bias=force_eos, extra_body={"ignore_eos": True})
    assert (out.choices[0].finish_reason, out.usage.completion_tokens) == ("length", 5)
    out = greedy(live, "the quick", 8, logit_bias=force_eos, extra_body={"min_tokens": 3})
    assert (out.choices[0].finish_reason, out.usage.completion_tokens) == ("stop", 4)


def test_chat_template_parts_developer_and_limits(live):
    model, tok = live.engine.model, live.api.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "fox?"}]
    text = render_chat(msgs, bos_token="<|bos|>", eos_token="<|eos|>")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids.count(live.api.bos) == 1 and ids[0] == live.api.bos
    status, tokenized = live.post("/tokenize", {"messages": msgs})
    assert tokenized["tokens"] == ids
    want = tok.decode(reference(model, ids, 7))
    kw = dict(model="tiny", temperature=0, max_completion_tokens=7)
    out = live.client.chat.completions.create(messages=msgs, **kw)
    assert out.id.startswith("chatcmpl-") and out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens <= 7
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "fox?"}]}]
    assert live.client.chat.completions.create(messages=parts, **kw).choices[0].message.content == want
    long = live.client.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 64  # no 16-token default: the server limit, within the context
    with pytest.raises(openai.BadRequestError) as err:
        live.client.chat.completions.create(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}], model="tiny")
    assert err.value.body["param"] == "messages"


def test_chat_logprobs_and_stream_ids(live):
    msgs = [{"role": "user", "content": "the quick"}]
    out = live.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=5,
                                              logprobs=True, top_logprobs=2)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(e.logprob == pytest.approx(max(e.logprob, e.top_logprobs[0].logprob)) for e in entries)
    chunks = list(live.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=5,
                                                      stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_completion_stream_matches_and_has_one_id(live):
    whole = greedy(live, "héllo", 10).choices[0].text
    chunks = list(greedy(live, "héllo", 10, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 10


@pytest.mark.parametrize("kwargs,param", [
    ({"extra_body": {"foo": 1}}, "foo"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"suffix": "x"}, "suffix"),
    ({"extra_body": {"temperature": "hot"}}, "temperature"),
    ({"extra_body": {"top_k": 2.5}}, "top_k"),
    ({"n": 1, "best_of": 0}, "best_of"),
    ({"prompt": "fox " * 130}, "prompt"),
    ({"prompt": [5000]}, None),
])
def test_bad_completion_requests_are_400_naming_the_parameter(live, kwargs, param):
    kw = {"model": "tiny", "prompt": "x", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        live.client.completions.create(**kw)
    assert err.value.body["param"] == param and err.value.body["message"]


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
])
def test_bad_chat_requests_are_400_naming_the_parameter(live, kwargs, param):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        live.client.chat.completions.create(**kw)
    assert err.value.body["param"] == param


def test_raw_http_bodies(live):
    body = json.dumps({"prompt": "import os", "max_tokens": 3}).encode()
    assert live.post("/v1/completions", None, body, {"Content-Type": "application/x-www-form-urlencoded"})[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    conn.request("POST", "/v1/completions", body=iter([body[:7], body[7:]]), encode_chunked=True)
    assert conn.getresponse().status == 200
    status, err = live.post("/v1/completions", None, b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    assert live.post("/v1/nothing", {})[0] == 404


def test_api_key(live):
    live.api.settings.api_key = "sesame"
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client.models.list()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{live.port}/v1", api_key="sesame", max_retries=0)
        assert client.models.list().data[0].id == "tiny"
    finally:
        live.api.settings.api_key = None


def test_tokenize_detokenize_and_metrics(live):
    status, out = live.post("/tokenize", {"prompt": "the fox", "add_special_tokens": False})
    assert status == 200 and out["tokens"] == ids_of(live, "the fox")[1:] and out["max_model_len"] == 128
    assert live.post("/tokenize", {"prompt": "the fox"})[1]["tokens"] == ids_of(live, "the fox")
    assert live.post("/detokenize", {"tokens": out["tokens"]})[1] == {"prompt": "the fox"}
    before = live.get("/metrics")[1]
    greedy(live, "the", 3)
    status, text = live.get("/metrics")
    assert status == 200
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line[:1] != "#"}
    old = {line.split()[0]: float(line.split()[1]) for line in before.splitlines() if line[:1] != "#"}
    assert value["deepseekmoe_generation_tokens_total"] == old["deepseekmoe_generation_tokens_total"] + 3
    assert value["deepseekmoe_request_latency_seconds_count"] > old["deepseekmoe_request_latency_seconds_count"]
    assert "deepseekmoe_num_requests_waiting" in value and "deepseekmoe_batch_size_count" in value


def test_short_request_is_not_held_behind_long_ones(live):
    """Continuous batching: a short request sent while long ones decode finishes first, with the tokens it gets
    alone."""
    alone = greedy(live, "über", 4).choices[0].text
    long_done: list[float] = []

    def long_call(p):
        greedy(live, p, 60, extra_body={"ignore_eos": True})
        long_done.append(time.perf_counter())

    threads = [threading.Thread(target=long_call, args=(p,)) for p in ("the", "the lazy dog", "jumps")]
    for t in threads:
        t.start()
    while live.engine.running < 3:
        time.sleep(0.005)
    busy = greedy(live, "über", 4).choices[0].text
    finished = time.perf_counter()
    for t in threads:
        t.join()
    assert busy == alone
    assert finished < min(long_done)


def test_disconnect_cancels_and_frees_the_slot(live, caplog):
    caplog.set_level(logging.INFO)
    stream = greedy(live, "the", 64, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    while live.engine.running == 0:
        time.sleep(0.005)
    stream.response.close()
    deadline = time.time() + 10
    while live.engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert live.engine.running == 0
    assert live.engine.metrics.finished.get("cancelled", 0) >= 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_disconnect_without_streaming_cancels_too(live):
    live.api.settings.max_tokens = 120
    slow = live.engine.model.register_forward_hook(lambda *_: time.sleep(0.01))  # 120 steps take over a second
    try:
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "the", "max_tokens": 120, "temperature": 0,
                                                            "ignore_eos": True}))
        cancelled = live.engine.metrics.finished.get("cancelled", 0)
        while live.engine.running == 0:
            time.sleep(0.005)
        conn.close()
        deadline = time.time() + 10
        while live.engine.running and time.time() < deadline:
            time.sleep(0.01)
    finally:
        live.api.settings.max_tokens = 64
        slow.remove()
    assert live.engine.running == 0 and live.engine.metrics.finished.get("cancelled", 0) == cancelled + 1


def test_timeout_and_full_queue():
    tok = tokenizer()
    server = Live(Engine(tiny_model(tok), tok, max_batch_size=1, max_queue=1), Settings("tiny", 100))
    try:
        server.api.settings.request_timeout_s = 0.05
        with pytest.raises(openai.APIStatusError) as err:
            server.client.completions.create(model="tiny", prompt="x", max_tokens=100, extra_body={"ignore_eos": True})
        assert err.value.status_code == 408
        server.api.settings.request_timeout_s = 60
        kw = dict(model="tiny", prompt="x", max_tokens=100, extra_body={"ignore_eos": True}, stream=True)
        first = server.client.completions.create(**kw)
        next(iter(first))  # running: the one row is taken
        second = threading.Thread(target=lambda: list(server.client.completions.create(**kw)))
        second.start()
        while server.engine.waiting == 0:
            time.sleep(0.005)
        with pytest.raises(openai.RateLimitError):
            server.client.completions.create(model="tiny", prompt="x", max_tokens=2)
        first.response.close()
        second.join()
    finally:
        server.close()


def test_checkpoint_chat_template_is_used(tmp_path):
    from deepseekmoe.inference.server import checkpoint_chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"}))
    template = checkpoint_chat_template(tmp_path)
    tok = tokenizer()
    api = OpenAIServer(Engine(tiny_model(tok), tok), Settings("tiny", 8, chat_template=template))
    from deepseekmoe.inference.protocol import Message

    prompt = api.chat_prompt([Message(role="user", content="hi")])
    assert prompt.ids == [api.bos] + tok.encode("<user>hi", add_special_tokens=False).ids
    api.engine.close()
    assert checkpoint_chat_template(tmp_path / "none") is None
