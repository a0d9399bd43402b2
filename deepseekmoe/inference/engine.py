"""A continuous-batching generation engine: requests join and leave the running batch at every decode step.

Shape legend: B running sequences, S prompt length, V vocabulary.

One worker thread owns the model and a KV cache of `max_batch_size` rows, each as long as the model's context. At
every step it admits waiting requests into free rows and decodes one token for every running sequence, each row at
its own position (`start_pos` as a (B,) tensor; see model/attention.py). Prompts of up to FUSED_PROMPT_TOKENS
tokens are prefilled in that same forward (right-padded rows from position 0, the running rows padded after their
one token); longer ones, and any admitted while nothing runs, get a right-padded prefill forward of their own whose
keys/values are copied into their rows. A sequence that finishes, is cancelled or passes its deadline leaves at once:
the last row moves into its place, so rows 0..B-1 are always the ones in use. A short request is therefore never held behind a long one.

Waiting requests sit in a bounded queue: `submit` raises `QueueFull` when it is full. Each request receives its
output through `sink` (called from the worker thread) as `Token` events and then `DONE` (or the exception that
broke the engine); `Request.stream()` is a blocking iterator over the same events for plain threads.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tokenizers import Tokenizer

from ..errors import UserValueError
from ..model import Transformer
from .metrics import EngineMetrics
from .params import SamplingParams, choose_token, process_logits

DONE = object()
FUSED_PROMPT_TOKENS = 32
"""Prompts up to this long join the running batch inside its decode forward; longer ones get a forward of their own."""
_ids = itertools.count()


class QueueFull(Exception):
    """The engine's waiting queue is at its limit."""


@dataclass
class Token:
    """One generated token: its id, the new text it completes (may be empty), and its log-probabilities."""
    id: int
    text: str
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    timeout_s: float | None = None
    sink: Callable[[object], None] | None = None
    """Called from the engine thread with each Token, then DONE or an exception; default: a queue for stream()."""
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[Token | None] | None = None
    finish_reason: str | None = None
    """stop, length, cancelled, timeout or error."""

    def __post_init__(self) -> None:
        self.id = next(_ids)
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        if self.sink is None:
            self._events: queue.Queue[object] = queue.Queue()
            self.sink = self._events.put

    def cancel(self) -> None:
        """Stop this request at the next step (its row is freed; finish_reason becomes 'cancelled')."""
        self.cancelled = True

    def stream(self):
        """Yield Token events until the request finishes (then finish_reason is set)."""
        while True:
            item = self._events.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    @property
    def expired(self) -> bool:
        return self.timeout_s is not None and time.perf_counter() - self.arrival > self.timeout_s


class _Sequence:
    """A running request: its row's length, the token to feed next, and incremental text with stop handling."""

    def __init__(self, request: Request, tokenizer: Tokenizer, done_ids: set[int], device: torch.device) -> None:
        self.request, self.tokenizer, self.done_ids = request, tokenizer, done_ids
        self.length = len(request.prompt_ids)
        self.next_token = -1
        self.done = False
        seed = request.params.seed
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    def push(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        r, p = self.request, self.request.params
        r.cumulative_logprob += logprob
        r.first_token_at = r.first_token_at or time.perf_counter()
        r.output_ids.append(token)
        text = self.tokenizer.decode([t for t in r.output_ids if t not in self.done_ids])
        if token in self.done_ids:  # what was held back goes out with it
            return self._finish("stop", Token(token, self._delta(text), logprob, top))
        self.next_token = token
        cuts = [i for i in (text.find(s, max(0, len(r.text) - len(s))) for s in p.stop) if i >= 0]
        if cuts:
            return self._finish("stop", Token(token, self._delta(text[:min(cuts)]), logprob, top))
        if len(r.output_ids) >= p.max_tokens:
            return self._finish("length", Token(token, self._delta(text), logprob, top))
        held = text.endswith("\ufffd")  # an incomplete multi-byte character waits for its last byte
        r.sink(Token(token, "" if held else self._delta(text[:len(text) - _stop_prefix(text, p.stop)]), logprob,
                     top))

    def _delta(self, text: str) -> str:
        r = self.request
        if len(text) > len(r.text) and text.startswith(r.text):
            piece, r.text = text[len(r.text):], text
            return piece
        return ""

    def _finish(self, reason: str, last: Token | None) -> None:
        if last is not None:
            self.request.sink(last)
        self.done = True
        self.request.finish_reason = reason


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 8,
                 max_queue: int = 256) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.context = model.config.max_position_embeddings
        self.eos = model.config.eos_token_id
        self.metrics = EngineMetrics()
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._running: list[_Sequence] = []
        self._caches = model.new_kv_caches(max_batch_size, self.context)
        self._worker = threading.Thread(target=self._loop, daemon=True, name="deepseekmoe-engine")
        self._worker.start()

    @property
    def max_batch_seen(self) -> int:
        return self.metrics.max_batch

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> Request:
        """Queue a request (ValueError for one that cannot run, QueueFull when the queue is at its limit)."""
        n = len(request.prompt_ids)
        request.params.check(self.model.config.vocab_size)
        if n == 0:
            raise UserValueError("the prompt is empty")
        if n + request.params.max_tokens > self.context:
            raise UserValueError(f"prompt of {n} tokens + max_tokens {request.params.max_tokens} exceeds the "
                             f"model's context of {self.context} tokens")
        if any(not 0 <= t < self.model.config.vocab_size for t in request.prompt_ids):
            raise UserValueError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the limit); try again later")
            self._waiting.append(request)
            self.metrics.requests_received += 1
            self._wake.notify()
        return request

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    return
            try:
                new = self._admit()
                if new and self._running and self._fusable(new):
                    self._step(new)
                    continue
                if new:
                    self._prefill(new)
                if self._running:
                    self._step([])
            except BaseException as exc:  # deliver the failure to every client in flight
                self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._wake:
            victims = [s.request for s in self._running] + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
        for r in victims:
            r.finish_reason = "error"
            r.sink(exc)

    def _admit(self) -> list[Request]:
        """The waiting requests that fit the free rows (those cancelled or past their deadline end here)."""
        new: list[Request] = []
        with self._wake:
            while self._waiting and len(self._running) + len(new) < self.max_batch_size:
                new.append(self._waiting.popleft())
        for r in [r for r in new if r.cancelled or r.expired]:
            self._end(r, "cancelled" if r.cancelled else "timeout")
        return [r for r in new if r.finish_reason is None]

    def _fusable(self, new: list[Request]) -> bool:
        """Short prompts are prefilled inside the decode step's forward (the running rows padded to their length)
        when every running row has room for that padding."""
        width = max(len(r.prompt_ids) for r in new)
        return (width <= FUSED_PROMPT_TOKENS and max(s.length for s in self._running) + width <= self.context
                and all(r.params.max_tokens > 0 and r.params.prompt_logprobs is None for r in new))

    @torch.inference_mode()
    def _prefill(self, requests: list[Request]) -> None:
        """Right-padded prompts at per-row positions from 0: causal attention keeps every real token from seeing
        the padding after it, and decoding overwrites a row's padding keys before any query can see them."""
        device = self.model.embed_tokens.weight.device
        lengths = [len(r.prompt_ids) for r in requests]
        ids = torch.zeros(len(requests), max(lengths), dtype=torch.long)
        for b, r in enumerate(requests):
            ids[b, :lengths[b]] = torch.tensor(r.prompt_ids)
        tmp = self.model.new_kv_caches(len(requests), max(lengths))
        start = torch.zeros(len(requests), dtype=torch.long, device=device)
        logits_BSV = self.model(ids.to(device), start_pos=start, kv_caches=tmp).logits
        self.metrics.prompt_tokens += sum(lengths)
        seqs, last = [], []
        for b, r in enumerate(requests):
            p = r.params
            if p.prompt_logprobs is not None:
                r.prompt_logprobs = self._prompt_logprobs(logits_BSV[b, :lengths[b]], r.prompt_ids,
                                                          p.prompt_logprobs)
            if p.max_tokens == 0:
                self._end(r, "length")
                continue
            row = len(self._running)
            for cache, t in zip(self._caches, tmp):
                cache.k[row, :, :lengths[b]] = t.k[b, :, :lengths[b]]
                cache.v[row, :, :lengths[b]] = t.v[b, :, :lengths[b]]
            seq = _Sequence(r, self.tokenizer, self._done_ids(p), device)
            self._running.append(seq)
            seqs.append(seq)
            last.append(logits_BSV[b, lengths[b] - 1])
        if seqs:
            self._choose(seqs, torch.stack(last))
            self._release()

    def _done_ids(self, p: SamplingParams) -> set[int]:
        ids = set(p.stop_token_ids)
        if self.eos is not None and not p.ignore_eos:
            ids.add(self.eos)
        return ids

    @torch.inference_mode()
    def _step(self, new: list[Request]) -> None:
        """One forward: the next token of every running row, and the prompts of `new` (right-padded, as in
        _prefill) in the rows after them; a running row's padding keys are overwritten before they are seen."""
        for i in reversed(range(len(self._running))):
            r = self._running[i].request
            if r.cancelled or r.expired:
                self._running[i].done = True
                r.finish_reason = "cancelled" if r.cancelled else "timeout"
        self._release()
        if not self._running and not new:
            return
        device = self.model.embed_tokens.weight.device
        n, lengths = len(self._running), [len(r.prompt_ids) for r in new]
        ids = torch.zeros(n + len(new), max([1, *lengths]), dtype=torch.long)
        ids[:n, 0] = torch.tensor([s.next_token for s in self._running], dtype=torch.long)
        for b, r in enumerate(new):
            ids[n + b, :lengths[b]] = torch.tensor(r.prompt_ids)
        start = torch.tensor([s.length for s in self._running] + [0] * len(new), device=device)
        logits_BSV = self.model(ids.to(device), start_pos=start, kv_caches=self._caches).logits
        self.metrics.observe_batch(n + len(new))
        self.metrics.prompt_tokens += sum(lengths)
        for seq in self._running:
            seq.length += 1
        self._running += [_Sequence(r, self.tokenizer, self._done_ids(r.params), device) for r in new]
        last = torch.tensor([0] * n + [k - 1 for k in lengths], device=device)
        self._choose(self._running, logits_BSV[torch.arange(n + len(new), device=device), last])
        self._release()

    def _choose(self, seqs: list[_Sequence], logits_BV: torch.Tensor) -> None:
        """The next token of every sequence: greedy rows without penalties in one argmax, the others one by one."""
        logprobs_BV = logits_BV.float().log_softmax(-1)
        tokens = logits_BV.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            r, p = seq.request, seq.request.params
            if p.temperature != 0 or p.needs_history:
                logits_V = logits_BV[i]
                if p.needs_history:
                    logits_V = process_logits(logits_V, p, r.prompt_ids, r.output_ids, sorted(seq.done_ids))
                tokens[i] = choose_token(logits_V, p, seq.generator)
        chosen = logprobs_BV.gather(1, torch.tensor(tokens, device=logits_BV.device)[:, None])[:, 0].tolist()
        self.metrics.generation_tokens += len(seqs)
        for i, seq in enumerate(seqs):
            k = seq.request.params.logprobs
            seq.push(tokens[i], chosen[i], _top(logprobs_BV[i], k) if k else [])

    def _release(self) -> None:
        """Drop finished rows; the last row moves into each freed one, so rows in use stay 0..B-1."""
        for i in reversed(range(len(self._running))):
            seq = self._running[i]
            if not seq.done:
                continue
            last = self._running.pop()
            if last is not seq:
                for cache in self._caches:
                    cache.move_row(len(self._running), i, last.length)
                self._running[i] = last
            self._end(seq.request, seq.request.finish_reason)

    def _end(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        self.metrics.observe_finish(request)
        request.sink(DONE)

    def _prompt_logprobs(self, logits_SV: torch.Tensor, ids: list[int], k: int) -> list[Token | None]:
        logprobs = logits_SV[:-1].float().log_softmax(-1)
        out: list[Token | None] = [None]
        for pos, token in enumerate(ids[1:]):
            out.append(Token(token, "", float(logprobs[pos, token]), _top(logprobs[pos], k) if k else []))
        return out


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins a stop string: held back, since it may become one."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def _top(logprobs_V: torch.Tensor, k: int) -> list[tuple[int, float]]:
    values, idx = torch.topk(logprobs_V, min(k, logprobs_V.shape[0]))
    return list(zip(idx.tolist(), values.tolist()))
