"""A batching generation engine: requests from many threads are decoded together, one forward per step.

A worker thread takes the first waiting request, gathers whatever else arrives within `batch_window_s` (up to
`max_batch_size`), left-pads the prompts into one batch (an attention mask hides the padding; rotary attention
depends only on relative positions, so every row computes what it would alone), prefills once and decodes all rows
step by step. Each request receives its text as it is produced through its own queue. Rows that finish early stop
emitting; the batch ends when every row is done.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from ..model import Transformer
from .sampling import check_sampling, sample

_DONE = object()


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    events: "queue.Queue[object]" = field(default_factory=queue.Queue)
    completion_tokens: int = 0
    finish_reason: str | None = None

    def stream(self):
        """Yield text pieces until the request finishes (then `finish_reason` is set)."""
        while True:
            item = self.events.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class _RowState:
    """Incremental detokenisation and stop handling for one row."""

    def __init__(self, request: Request, tokenizer: Tokenizer) -> None:
        self.request, self.tokenizer = request, tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.done = False
        self.generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None

    def push(self, token: int, eos: int | None) -> None:
        r = self.request
        if eos is not None and token == eos:
            return self._finish("stop", self.tokenizer.decode(self.ids))
        self.ids.append(token)
        r.completion_tokens += 1
        text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (text.find(s, max(0, len(self.sent) - len(s))) for s in r.stop) if i >= 0]
        if cuts:
            return self._finish("stop", text[:min(cuts)])
        if r.completion_tokens >= r.max_tokens:
            return self._finish("length", text)
        if not text.endswith("\ufffd"):  # hold back what may be an incomplete multi-byte character
            self._emit(text)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.request.events.put(text[len(self.sent):])
            self.sent = text

    def _finish(self, reason: str, text: str) -> None:
        self._emit(text)
        self.done = True
        self.request.finish_reason = reason
        self.request.events.put(_DONE)


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 8,
                 batch_window_s: float = 0.01) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.eos = model.config.eos_token_id
        self._queue: "queue.Queue[Request | None]" = queue.Queue()
        self._lock = threading.Lock()
        self.batches_run = 0
        self.max_batch_seen = 0
        self._worker = threading.Thread(target=self._loop, daemon=True, name="deepseekmoe-engine")
        self._worker.start()

    def submit(self, request: Request) -> Request:
        check_sampling(request.temperature, request.top_k, request.top_p)
        need = len(request.prompt_ids) + request.max_tokens
        limit = self.model.config.max_position_embeddings
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if need > limit:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens + max_tokens {request.max_tokens} "
                             f"exceeds the model's context of {limit} tokens")
        self._queue.put(request)
        return request

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)

    def _gather(self) -> list[Request] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch_size:
            try:
                nxt = self._queue.get(timeout=self.batch_window_s)
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _loop(self) -> None:
        while (batch := self._gather()) is not None:
            try:
                self._run(batch)
            except BaseException as exc:  # deliver the failure to every waiting client
                for r in batch:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.events.put(exc)

    @torch.inference_mode()
    def _run(self, batch: list[Request]) -> None:
        self.batches_run += 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        device = self.model.embed_tokens.weight.device
        width = max(len(r.prompt_ids) for r in batch)
        steps = max(r.max_tokens for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width + steps, dtype=torch.bool)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = True
        ids, mask = ids.to(device), mask.to(device)
        caches = self.model.new_kv_caches(len(batch), width + steps)
        logits = self.model(ids, kv_caches=caches, attention_mask=mask[:, :width]).logits[:, -1]
        rows = [_RowState(r, self.tokenizer) for r in batch]
        for step in range(steps):
            tokens = [self._pick(logits[i:i + 1], st) for i, st in enumerate(rows)]
            for st, tok in zip(rows, tokens):
                if not st.done:
                    st.push(tok, self.eos)
            if all(st.done for st in rows) or step == steps - 1:
                break
            nxt = torch.tensor(tokens, device=device)[:, None]
            pos = width + step
            logits = self.model(nxt, start_pos=pos, kv_caches=caches,
                                attention_mask=mask[:, :pos + 1]).logits[:, -1]

    @staticmethod
    def _pick(logits_1V: torch.Tensor, st: _RowState) -> int:
        if st.done:
            return 0
        r = st.request
        return int(sample(logits_1V, r.temperature, r.top_k, r.top_p, st.generator)[0])
