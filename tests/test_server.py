"""The OpenAI-compatible server's outputs, through the real `openai` client against a live uvicorn server.

Every output is checked against an independent computation on the same random tiny model: plain full forwards
(no KV cache) for greedy tokens, log-probabilities and the penalties' effect, and single-request greedy decoding.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")

from deepseekmoe.data.chat import render_chat  # noqa: E402
from live_server import greedy, ids_of, live, reference  # noqa: E402, F401

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
