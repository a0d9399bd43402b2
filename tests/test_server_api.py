"""The server's API surface through the real `openai` client and raw HTTP: errors naming the parameter, the API key,
/tokenize, /detokenize, /metrics, disconnects, timeouts, a full queue, the checkpoint's chat template."""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import pytest

openai = pytest.importorskip("openai")

from deepseekmoe.inference.engine import Engine  # noqa: E402
from deepseekmoe.inference.server import OpenAIServer, Settings  # noqa: E402
from live_server import Live, greedy, ids_of, live, tiny_model, tokenizer  # noqa: E402, F401

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
