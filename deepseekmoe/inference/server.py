"""An OpenAI-compatible HTTP API over the continuous-batching engine, on FastAPI + uvicorn (as vLLM's server).

Endpoints: POST /v1/completions, /v1/chat/completions (both stream as server-sent events ending in
`data: [DONE]`), GET /v1/models, /v1/models/{id}, /health, /metrics (Prometheus text), /tokenizer_info,
POST /tokenize, /detokenize; /docs is the interactive schema. Errors are OpenAI error objects
`{"error": {"message", "type", "param", "code"}}`: 400 for an unknown, ill-typed or unsupported parameter (naming
it), 401 for a wrong API key, 404 for an unknown model, 429 when the queue is full, 408 past the request timeout.

Every prompt is conditioned on the bos token, as training saw documents begin: a text prompt gets it prepended, a
token-id prompt too unless it starts with it, and a chat prompt is rendered by the chat template (which writes it).
Echoed prompts and prompt log-probabilities cover the prompt as the client gave it, so its first token has a
log-probability (conditioned on bos) unless the client sent bos itself.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..data.chat import CHAT_TEMPLATE, render_chat
from ..errors import UserValueError
from ..filenames import TOKENIZER_CONFIG_FILE
from .engine import DONE, Engine, QueueFull, Request, Token
from .protocol import Message
from .responses import LogprobFormatter


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(exc: ApiError) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        exc.status, "invalid_request_error" if exc.status < 500 else "server_error")
    return JSONResponse({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}},
                        status_code=exc.status)


@dataclass
class Settings:
    model_name: str
    max_tokens: int
    """The largest max_tokens a request may ask for."""
    api_key: str | None = None
    request_timeout_s: float | None = 600.0
    chat_template: str | None = None


@dataclass
class Prompt:
    ids: list[int]
    shown: int
    """Index of the first token the client gave (1 when bos was added for it)."""
    text: str


class OpenAIServer:
    """Validation, prompt encoding and response shapes; the FastAPI routes in make_app only call into this."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings
        self.tokenizer = engine.tokenizer
        cfg = engine.model.config
        self.context, self.bos, self.eos = cfg.max_position_embeddings, cfg.bos_token_id, cfg.eos_token_id
        self.template = settings.chat_template or CHAT_TEMPLATE
        self.formatter = LogprobFormatter(self.tokenizer)

    def token_text(self, token: int | None) -> str | None:
        return None if token is None else self.tokenizer.id_to_token(token)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise ApiError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": 0, "owned_by": "deepseekmoe",
                "max_model_len": self.context}

    def prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            text = prompt
        else:
            ids, text = list(prompt), self.tokenizer.decode(prompt)
        if self.bos is not None and ids[:1] != [self.bos]:
            return Prompt([self.bos] + ids, 1, text)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return Prompt(ids, 0, text)

    def chat_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> Prompt:
        from jinja2 import TemplateError

        try:
            text = render_chat([m.as_template_input() for m in messages], bos_token=self.token_text(self.bos) or "",
                               eos_token=self.token_text(self.eos) or "", template=self.template,
                               add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise ApiError(400, f"the chat template cannot render these messages: {exc}", "messages") from None
        return self.prompt(text)

    def max_tokens(self, asked: int | None, default: int | None, prompt: Prompt, param: str) -> int:
        room = self.context - len(prompt.ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt.ids)} tokens; the model's context is {self.context}",
                           "prompt")
        if asked is None:
            return min(room, self.settings.max_tokens, default or room)
        if asked > self.settings.max_tokens:
            raise ApiError(400, f"'{param}'={asked} is above this server's limit of {self.settings.max_tokens}",
                           param)
        if asked > room:
            raise ApiError(400, f"the prompt has {len(prompt.ids)} tokens, so '{param}' can be at most {room} "
                           f"within the model's context of {self.context} tokens", param)
        return asked

    def submit(self, requests: list[Request]) -> None:
        """Queue every request, or none: a full queue is a 429, an impossible request a 400."""
        for i, r in enumerate(requests):
            try:
                self.engine.submit(r)
            except (QueueFull, ValueError) as exc:
                for done in requests[:i]:
                    done.cancel()
                if isinstance(exc, QueueFull):
                    raise ApiError(429, str(exc), None, "queue_full") from None
                raise ApiError(400, str(exc), None) from None


class Pending:
    """The engine's events for a group of requests, delivered to the event loop as (index, Token | DONE); without
    streaming only DONE (the tokens are in `tokens`)."""

    def __init__(self, stream: bool = False) -> None:
        self.stream = stream
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self.requests: list[Request] = []
        self.tokens: list[list[Token]] = []

    def add(self, ids: list[int], params: Any, timeout_s: float | None) -> Request:
        i = len(self.requests)
        r = Request(ids, params, timeout_s=timeout_s, sink=lambda item: self._put(i, item))
        self.requests.append(r)
        self.tokens.append([])
        return r

    def _put(self, i: int, item: object) -> None:
        """From the engine thread: tokens are kept here; the event loop is woken for each only when streaming."""
        if isinstance(item, Token):
            self.tokens[i].append(item)
            if not self.stream:
                return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, item))
        except RuntimeError:  # the event loop is gone (the server is shutting down)
            self.requests[i].cancel()

    async def events(self, http: HttpRequest | None = None) -> AsyncIterator[tuple[int, object]]:
        """Yield events until every request is done; on exit the unfinished are cancelled. With `http` (a response
        not streamed yet), a client that goes away cancels them too (a streamed response is cancelled by Starlette)."""
        remaining = len(self.requests)
        watcher = asyncio.create_task(self._cancel_on_disconnect(http)) if http is not None else None
        try:
            while remaining:
                i, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is DONE:
                    remaining -= 1
                yield i, item
        finally:
            if watcher is not None:
                watcher.cancel()
            for r in self.requests:
                if r.finish_reason is None:
                    r.cancel()

    async def _cancel_on_disconnect(self, http: HttpRequest) -> None:
        """Wait (without polling) for the client to go away; then the engine ends the requests as cancelled."""
        while (await http.receive())["type"] != "http.disconnect":
            pass
        for r in self.requests:
            r.cancel()

    async def wait(self, http: HttpRequest) -> None:
        async for _ in self.events(http):
            pass
        for r in self.requests:
            if r.finish_reason == "timeout":
                raise ApiError(408, "the request timed out", None, "timeout")
            if r.finish_reason is None or r.finish_reason == "cancelled":
                raise ApiError(499, "the client went away", None)


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def stream_error(r: Request) -> str | None:
    if r.finish_reason in ("timeout", "error"):
        status = 408 if r.finish_reason == "timeout" else 500
        return sse({"error": {"message": f"the request ended: {r.finish_reason}", "type": "server_error",
                              "param": None, "code": status}})
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one error line naming what is wrong (before any model is loaded)."""
    if not 0 <= port <= 65535:
        raise UserValueError(f"--port {port} is not a TCP port (0-65535; 0 picks a free one)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserValueError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = "the address is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise UserValueError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def checkpoint_chat_template(ckpt: Path) -> str | None:
    """The `chat_template` of the checkpoint's tokenizer_config.json, when it has one."""
    path = ckpt / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise UserValueError(f"{path}: not a JSON object ({exc})") from None
    if template is not None and not isinstance(template, str):
        raise UserValueError(f"{path}: chat_template must be a string (named templates are not supported)")
    return template
