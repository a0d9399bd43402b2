"""OpenAI response shapes built from engine output: choices, logprobs (completions and chat styles), usage."""

from __future__ import annotations

import time
import uuid
from typing import Any

from tokenizers import Tokenizer

from ..data.tokenizer import byte_level_alphabet
from .engine import Request, Token


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def envelope(rid: str, kind: str, model: str, choices: list[dict[str, Any]], created: int | None = None,
             usage: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": kind, "created": created or int(time.time()), "model": model,
                           "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LogprobFormatter:
    """Token log-probabilities as completions ("tokens", "token_logprobs", "top_logprobs", "text_offset") or
    chat ({"content": [{"token", "logprob", "bytes", "top_logprobs"}]}) expect them."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes_of_char = byte_level_alphabet()

    def text(self, token: int) -> str:
        """The token's text; a piece of a multi-byte character is spelled "bytes:\\xNN" as OpenAI does."""
        piece = self.tokenizer.decode([token], skip_special_tokens=False)
        if "\ufffd" not in piece:
            return piece
        raw = self.raw_bytes(token)
        return piece if raw is None else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def raw_bytes(self, token: int) -> bytes | None:
        """The bytes of a byte-level BPE token (None for a token outside that alphabet)."""
        chars = self.tokenizer.id_to_token(token) or ""
        if not chars or any(c not in self._bytes_of_char for c in chars):
            return None
        return bytes(self._bytes_of_char[c] for c in chars)

    def completion(self, tokens: list[Token | None], prompt_ids: list[int], offset: int = 0) -> dict[str, Any]:
        """`tokens[i]` None means no log-probability (the first token of a prompt that starts the text)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        ids = [t.id if t is not None else prompt_ids[0] for t in tokens]
        for token_id, entry in zip(ids, tokens):
            piece = self.text(token_id)
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            out["token_logprobs"].append(None if entry is None else entry.logprob)
            top = None if entry is None else {self.text(t): lp for t, lp in entry.top}
            if top is not None and entry is not None:
                top.setdefault(piece, entry.logprob)
            out["top_logprobs"].append(top)
        return out

    def chat(self, tokens: list[Token]) -> dict[str, Any]:
        return {"content": [self._chat_entry(t.id, t.logprob, t.top) for t in tokens]}

    def _chat_entry(self, token: int, logprob: float, top: list[tuple[int, float]] | None) -> dict[str, Any]:
        piece = self.text(token)
        raw = self.raw_bytes(token) if piece.startswith("bytes:") else None
        entry: dict[str, Any] = {"token": piece, "logprob": logprob, "bytes": list(raw or piece.encode())}
        if top is not None:
            entry["top_logprobs"] = [self._chat_entry(t, lp, None) for t, lp in top]
        return entry


def best_of(requests: list[Request], n: int) -> list[Request]:
    """The n candidates with the highest cumulative log-probability (OpenAI's best_of), best first."""
    return sorted(requests, key=lambda r: r.cumulative_logprob, reverse=True)[:n]
