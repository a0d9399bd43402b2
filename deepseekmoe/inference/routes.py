"""The FastAPI application: routes, error handlers and the API key check, over an OpenAIServer."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from .engine import DONE, Token
from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .responses import best_of, envelope, new_id, usage
from .server import ApiError, OpenAIServer, Pending, Prompt, error_response, sse, stream_error, stream_response


def _validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", None, "invalid_json")
    if not loc:
        return ApiError(400, f"the request body is not a JSON object of the expected shape: {err['msg']}")
    name = ".".join(loc[:1] + [p for p in loc[1:] if not p[:1].isalpha() or p.isidentifier()])
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown or unsupported parameter '{name}'", loc[0], "unknown_parameter")
    return ApiError(400, f"'{name}': {err['msg']}", loc[0], "invalid_value")


class JsonBodies:
    """Every POST body is read as JSON, whatever its Content-Type says (`curl -d` sends a form type)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class ApiKey:
    """With --api-key set, /v1 requests need "Authorization: Bearer KEY" (a pure ASGI layer, so a client that goes
    away is still seen by the route)."""

    def __init__(self, app: Any, api: OpenAIServer) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        key = self.api.settings.api_key
        if key and scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {key}":
                response = error_response(ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                                   None, "invalid_api_key"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def make_app(api: OpenAIServer) -> FastAPI:
    app = FastAPI(title="deepseekmoe", description="OpenAI-compatible API for a deepseekmoe checkpoint")
    app.add_middleware(JsonBodies)
    app.add_middleware(ApiKey, api=api)

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(_: HttpRequest, exc: HTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    _info_routes(app, api)
    _tokenizer_routes(app, api)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest) -> Any:
        return await _completions(api, body, http)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest) -> Any:
        return await _chat(api, body, http)

    return app


def _info_routes(app: FastAPI, api: OpenAIServer) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return api.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        api.check_model(model_id)
        return api.model_card()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = api.engine.metrics.render(api.engine.running, api.engine.waiting)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _tokenizer_routes(app: FastAPI, api: OpenAIServer) -> None:
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"tokenizer_class": "tokenizers.Tokenizer", "bos_token": api.token_text(api.bos),
                "eos_token": api.token_text(api.eos), "pad_token": None, "chat_template": api.template,
                "model_max_length": api.context}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        api.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of 'prompt' or 'messages'", "prompt")
        if body.messages is not None:
            ids = api.chat_prompt(body.messages, body.add_generation_prompt).ids
        else:
            ids = api.tokenizer.encode(body.prompt, add_special_tokens=False).ids
            if body.add_special_tokens and api.bos is not None:
                ids = [api.bos] + ids
        return {"count": len(ids), "max_model_len": api.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        api.check_model(body.model)
        vocab = api.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": api.tokenizer.decode(body.tokens)}


async def _completions(api: OpenAIServer, body: CompletionRequest, http: HttpRequest) -> Any:
    api.check_model(body.model)
    if body.suffix is not None:
        raise ApiError(400, "'suffix' is not supported (this model has no fill-in-the-middle mode)", "suffix")
    n, candidates = body.n, body.best_of or body.n
    if candidates < n:
        raise ApiError(400, f"best_of={candidates} must be at least n={n}", "best_of")
    if body.stream and candidates > n:
        raise ApiError(400, "best_of above n cannot be streamed", "best_of")
    if not body.prompts():
        raise ApiError(400, "the prompt list is empty", "prompt")
    prompts = [api.prompt(p) for p in body.prompts()]
    logprobs = body.logprobs if body.logprobs is not None else (0 if candidates > n else None)
    pending = Pending(body.stream)
    for prompt in prompts:
        max_tokens = api.max_tokens(body.max_tokens, 16, prompt, "max_tokens")
        if max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens=0 only makes sense with echo", "max_tokens")
        for j in range(candidates):
            params = body.sampling(max_tokens, logprobs, seed_offset=j)
            params.prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
            pending.add(prompt.ids, params, api.settings.request_timeout_s)
    api.submit(pending.requests)
    rid, created = new_id("cmpl"), int(time.time())
    if body.stream:
        return stream_response(_stream_completion(api, body, prompts, pending, rid, created))
    await pending.wait(http)
    choices = []
    for p_idx, prompt in enumerate(prompts):
        group = list(range(p_idx * candidates, (p_idx + 1) * candidates))
        chosen = best_of([pending.requests[i] for i in group], n) if candidates > n else \
            [pending.requests[i] for i in group]
        for j, r in enumerate(chosen):
            i = pending.requests.index(r)
            choices.append({"index": p_idx * n + j, "text": (prompt.text if body.echo else "") + r.text,
                            "logprobs": _completion_logprobs(api, body, prompt, r, pending.tokens[i]),
                            "finish_reason": r.finish_reason})
    return envelope(rid, "text_completion", api.settings.model_name, choices, created, _usage(prompts, pending))


def _usage(prompts: list[Prompt], pending: Pending) -> dict[str, int]:
    return usage(sum(len(p.ids) for p in prompts), sum(len(r.output_ids) for r in pending.requests))


def _completion_logprobs(api: OpenAIServer, body: CompletionRequest, prompt: Prompt, r: Any,
                         tokens: list[Token]) -> dict[str, Any] | None:
    if body.logprobs is None:
        return None
    shown = (r.prompt_logprobs or [])[prompt.shown:] if body.echo else []
    return api.formatter.completion(shown + tokens, prompt.ids[prompt.shown:])


async def _stream_completion(api: OpenAIServer, body: CompletionRequest, prompts: list[Prompt], pending: Pending,
                             rid: str, created: int) -> AsyncIterator[str]:
    name, n = api.settings.model_name, body.n

    def chunk(i: int, text: str, logprobs: Any = None, finish: str | None = None) -> str:
        return sse(envelope(rid, "text_completion", name, [{"index": i, "text": text, "logprobs": logprobs,
                                                             "finish_reason": finish}], created))

    async for i, item in pending.events():
        r, prompt = pending.requests[i], prompts[i // n]
        if isinstance(item, Token) and item is pending.tokens[i][0] and body.echo:
            yield chunk(i, prompt.text, _completion_logprobs(api, body, prompt, r, []))
        if isinstance(item, Token) and (item.text or body.logprobs is not None):
            lp = api.formatter.completion([item], [item.id]) if body.logprobs is not None else None
            yield chunk(i, item.text, lp)
        elif item is DONE:
            error = stream_error(r)
            yield error if error else chunk(i, "", None, r.finish_reason)
    if body.stream_options and body.stream_options.include_usage:
        yield sse(envelope(rid, "text_completion", name, [], created, _usage(prompts, pending)))
    yield sse("[DONE]")


async def _chat(api: OpenAIServer, body: ChatRequest, http: HttpRequest) -> Any:
    api.check_model(body.model)
    prompt = api.chat_prompt(body.messages, body.add_generation_prompt)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = api.max_tokens(asked, None, prompt,
                                "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
    if max_tokens == 0:
        raise ApiError(400, "max_tokens must be at least 1", "max_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    pending = Pending(body.stream)
    for j in range(body.n):
        pending.add(prompt.ids, body.sampling(max_tokens, logprobs, seed_offset=j), api.settings.request_timeout_s)
    api.submit(pending.requests)
    rid, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        return stream_response(_stream_chat(api, body, prompt, pending, rid, created))
    await pending.wait(http)
    choices = [{"index": j, "message": {"role": "assistant", "content": r.text},
                "logprobs": api.formatter.chat(pending.tokens[j]) if body.logprobs else None,
                "finish_reason": r.finish_reason} for j, r in enumerate(pending.requests)]
    return envelope(rid, "chat.completion", api.settings.model_name, choices, created,
                    _usage([prompt], pending))


async def _stream_chat(api: OpenAIServer, body: ChatRequest, prompt: Prompt, pending: Pending, rid: str,
                       created: int) -> AsyncIterator[str]:
    name = api.settings.model_name

    def chunk(i: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> str:
        return sse(envelope(rid, "chat.completion.chunk", name, [{"index": i, "delta": delta, "logprobs": logprobs,
                                                                  "finish_reason": finish}], created))

    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, item in pending.events():
        r = pending.requests[i]
        if isinstance(item, Token) and (item.text or body.logprobs):
            yield chunk(i, {"content": item.text}, api.formatter.chat([item]) if body.logprobs else None)
        elif item is DONE:
            error = stream_error(r)
            yield error if error else chunk(i, {}, None, r.finish_reason)
    if body.stream_options and body.stream_options.include_usage:
        yield sse(envelope(rid, "chat.completion.chunk", name, [], created, _usage([prompt], pending)))
    yield sse("[DONE]")
