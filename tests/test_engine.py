"""The continuous-batching engine and the per-row KV cache under it, against plain full forwards and generate()."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models

from conftest import tiny_config
from deepseekmoe import Transformer
from deepseekmoe.inference.engine import Engine, QueueFull, Request
from deepseekmoe.inference.generate import generate
from deepseekmoe.inference.params import SamplingParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny_config(max_position_embeddings=128)).eval()


def word_tokenizer() -> Tokenizer:
    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0"))


def test_per_row_positions_equal_full_forwards(model):
    """Rows of different lengths, each in its own cache row, decode one token each at their own positions."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 9, 2)]
    nxt = [3, 7, 11]
    caches = model.new_kv_caches(4, 32)
    with torch.no_grad():
        lengths = torch.tensor([len(p) for p in prompts])
        padded = torch.zeros(3, 9, dtype=torch.long)
        for b, p in enumerate(prompts):
            padded[b, :len(p)] = torch.tensor(p)
        prefill = model(padded, start_pos=torch.zeros(3, dtype=torch.long), kv_caches=caches).logits
        step = model(torch.tensor(nxt)[:, None], start_pos=lengths, kv_caches=caches).logits[:, -1]
        for b, p in enumerate(prompts):
            full = model(torch.tensor([p + [nxt[b]]])).logits[0]
            assert torch.allclose(prefill[b, len(p) - 1], full[-2], atol=1e-5)
            assert torch.allclose(step[b], full[-1], atol=1e-5)


def test_rows_join_and_leave_and_each_equals_generate(model):
    """More requests than rows, of different lengths: all run to the tokens single-request greedy decoding gives."""
    engine = Engine(model, word_tokenizer(), max_batch_size=3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 12, 5, 1, 7, 9, 2)]
    requests = [engine.submit(Request(p, SamplingParams(max_tokens=4 + 5 * (i % 3), temperature=0)))
                for i, p in enumerate(prompts)]
    try:
        for r, p in zip(requests, prompts):
            tokens = [t.id for t in r.stream()]
            assert tokens == r.output_ids == generate(model, p, len(tokens), temperature=0)
            assert r.finish_reason == "length" and len(tokens) == r.params.max_tokens
        assert engine.max_batch_seen == 3 and engine.running == 0
    finally:
        engine.close()


def test_seeded_sampling_is_reproducible_and_queue_is_bounded(model):
    engine = Engine(model, word_tokenizer(), max_batch_size=2, max_queue=2)
    try:
        params = dict(max_tokens=10, temperature=1.0, top_k=20, seed=5)
        a = engine.submit(Request([1, 2, 3], SamplingParams(**params)))
        b = engine.submit(Request([1, 2, 3], SamplingParams(**params)))
        assert [t.id for t in a.stream()] == [t.id for t in b.stream()]
        with pytest.raises(ValueError, match="context"):
            engine.submit(Request([1] * 100, SamplingParams(max_tokens=29)))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit(Request([1], SamplingParams(logit_bias={500: 1.0})))
    finally:
        engine.close()
    stopped = Engine(model, word_tokenizer(), max_batch_size=1, max_queue=2)
    stopped.close()  # the worker is gone: submitted requests stay queued
    stopped.submit(Request([1], SamplingParams()))
    stopped.submit(Request([1], SamplingParams()))
    with pytest.raises(QueueFull):
        stopped.submit(Request([1], SamplingParams()))


def test_cancel_frees_the_row(model):
    engine = Engine(model, word_tokenizer(), max_batch_size=1)
    try:
        long = engine.submit(Request([1, 2], SamplingParams(max_tokens=120, temperature=0)))
        events = long.stream()
        next(events)
        long.cancel()
        assert len(list(events)) < 119 and long.finish_reason == "cancelled"
        short = engine.submit(Request([4], SamplingParams(max_tokens=3, temperature=0)))
        assert len(list(short.stream())) == 3
    finally:
        engine.close()
