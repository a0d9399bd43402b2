"""An OpenAI-compatible HTTP API over the batching engine (standard library HTTP server, one thread per client).

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with "stream": true as
server-sent events ending in `data: [DONE]`). Invalid requests get a 4xx with an OpenAI-style error object.
Chat messages are rendered as the DeepSeek chat format: "User: ...\n\nAssistant: ..." turns (a system message first,
as plain text), ending with "Assistant:" for the model to continue.
"""

from __future__ import annotations

import json
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .engine import Engine, Request
from .generate import encode_prompt


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def render_chat(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ApiError(400, "each message needs a string 'content'", "messages")
        role = m.get("role")
        if role == "system":
            parts.append(m["content"] + "\n\n")
        elif role == "user":
            parts.append(f"User: {m['content']}\n\n")
        elif role == "assistant":
            parts.append(f"Assistant: {m['content']}\n\n")
        else:
            raise ApiError(400, f"unknown message role {role!r}", "messages")
    return "".join(parts) + "Assistant:"


class Api:
    """Request validation and response shapes; transport-free so it can be tested directly."""

    def __init__(self, engine: Engine, model_name: str, max_tokens_limit: int, max_prompt_tokens: int) -> None:
        self.engine, self.model_name = engine, model_name
        self.max_tokens_limit, self.max_prompt_tokens = max_tokens_limit, max_prompt_tokens

    def make_request(self, body: dict[str, Any], prompt: str) -> Request:
        max_tokens = _number(body, "max_tokens", 16, int, 1, self.max_tokens_limit)
        ids = encode_prompt(self.engine.tokenizer, prompt, self.engine.model.config.bos_token_id)
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(400, f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}", "prompt")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of non-empty strings", "stop")
        top_p = body.get("top_p")
        req = Request(ids, max_tokens, temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
                      top_p=None if top_p is None else _number(body, "top_p", 1.0, float, 1e-6, 1.0),
                      seed=_number(body, "seed", None, int, 0, 2**63 - 1), stop=stop)
        try:
            return self.engine.submit(req)
        except ValueError as exc:
            raise ApiError(400, str(exc), "max_tokens") from None

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "deepseekmoe"}]}

    def completion_prompt(self, body: dict[str, Any]) -> str:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", "prompt")
        return prompt

    def envelope(self, kind: str, choice: dict[str, Any], req: Request | None = None) -> dict[str, Any]:
        out = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
               "model": self.model_name, "choices": [{"index": 0, **choice}]}
        if req is not None:
            p = len(req.prompt_ids)
            out["usage"] = {"prompt_tokens": p, "completion_tokens": req.completion_tokens,
                            "total_tokens": p + req.completion_tokens}
        return out


def _number(body: dict[str, Any], key: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"'{key}' must be a {'integer' if kind is int else 'number'}", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}'={value} is out of range [{lo}, {hi}]", key)
    return kind(value)


class Handler(BaseHTTPRequestHandler):
    api: Api  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            return self._json(200, {"status": "ok"})
        if self.path == "/v1/models":
            return self._json(200, self.api.models())
        self._error(ApiError(404, f"no route GET {self.path}"))

    def do_POST(self) -> None:
        try:
            body = self._body()
            if self.path == "/v1/completions":
                self._complete(body, chat=False)
            elif self.path == "/v1/chat/completions":
                self._complete(body, chat=True)
            else:
                raise ApiError(404, f"no route POST {self.path}")
        except ApiError as exc:
            self._error(exc)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            raise ApiError(413, "request body over 1 MiB")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except json.JSONDecodeError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _complete(self, body: dict[str, Any], chat: bool) -> None:
        prompt = render_chat(body.get("messages")) if chat else self.api.completion_prompt(body)
        req = self.api.make_request(body, prompt)
        kind = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            return self._stream(req, chat, kind)
        text = "".join(req.stream())
        choice = ({"message": {"role": "assistant", "content": text}} if chat
                  else {"text": text, "logprobs": None})
        self._json(200, self.api.envelope(kind, {**choice, "finish_reason": req.finish_reason}, req))

    def _stream(self, req: Request, chat: bool, kind: str) -> None:
        kind = kind + ".chunk" if chat else kind
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        first = {"delta": {"role": "assistant", "content": ""}} if chat else None
        if first:
            self._event(self.api.envelope(kind, {**first, "finish_reason": None}))
        for piece in req.stream():
            choice = {"delta": {"content": piece}} if chat else {"text": piece, "logprobs": None}
            self._event(self.api.envelope(kind, {**choice, "finish_reason": None}))
        last = {"delta": {}} if chat else {"text": "", "logprobs": None}
        self._event(self.api.envelope(kind, {**last, "finish_reason": req.finish_reason}, req))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, obj: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: ApiError) -> None:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        phrase = HTTPStatus(exc.status).phrase
        self._json(exc.status, {"error": {"message": exc.message, "type": kind, "param": exc.param,
                                          "code": phrase.lower().replace(" ", "_")}})


def make_server(api: Api, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_command(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
                  max_tokens: int = 512, max_prompt_tokens: int | None = None, device: str | None = None,
                  quantize: str | None = None) -> int:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health). Concurrent requests are decoded together in batches. Listens on localhost unless told otherwise.

    Args:
        checkpoint: a run directory (its latest checkpoint) or a checkpoint directory.
        host: address to bind (127.0.0.1 by default; 0.0.0.0 exposes the server to the network).
        port: TCP port.
        max_batch_size: most requests decoded together.
        max_tokens: largest max_tokens a request may ask for.
        max_prompt_tokens: longest prompt accepted (default: the model's context minus max_tokens).
        device: cpu, cuda, ... (default: cuda when available).
        quantize: int8 or int4: quantize a float checkpoint or HF directory while loading it (CPU; a
            checkpoint written by `convert --quantize` runs quantized without it)
    """
    from .loading import load_for_inference

    model, tokenizer, ckpt = load_for_inference(checkpoint, device, quantize)
    context = model.config.max_position_embeddings
    if max_tokens >= context:
        raise ValueError(f"max_tokens={max_tokens} must be below the model's context of {context} tokens")
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size)
    api = Api(engine, ckpt.name, max_tokens, max_prompt_tokens or context - max_tokens)
    server = make_server(api, host, port)
    print(f"serving {ckpt} on http://{host}:{server.server_address[1]}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0
