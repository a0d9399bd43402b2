"""`deepseekmoe serve`: a checkpoint behind the OpenAI-compatible HTTP API (inference/server.py, routes.py)."""

from __future__ import annotations

import uvicorn

from ..errors import UserValueError
from ..inference.engine import Engine
from ..inference.loading import load_for_inference
from ..inference.routes import make_app
from ..inference.server import OpenAIServer, Settings, bind, checkpoint_chat_template


def serve_command(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000,
                  served_model_name: str | None = None, api_key: str | None = None, max_batch_size: int = 8,
                  max_queue: int = 256, max_tokens: int | None = None, request_timeout: float = 600.0,
                  device: str | None = None, quantize: str | None = None) -> int:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (FastAPI + uvicorn): /v1/completions,
    /v1/chat/completions, /v1/models, /tokenize, /detokenize, /metrics, /health, /docs. Requests join and leave
    the running batch at every decode step (continuous batching). Listens on localhost unless told otherwise.

    Args:
        checkpoint: a run directory (its latest checkpoint) or a checkpoint directory.
        host: address to bind (127.0.0.1 by default; 0.0.0.0 exposes the server to the network).
        port: TCP port (0 picks a free one).
        served_model_name: the model name clients use (default: CHECKPOINT as given); others get a 404.
        api_key: when set, /v1 requests need the header "Authorization: Bearer API_KEY".
        max_batch_size: most sequences decoded together.
        max_queue: most requests waiting for a place in the batch; more get a 429.
        max_tokens: largest max_tokens a request may ask for (default: the model's context minus one).
        request_timeout: seconds a request may take, waiting included, before it is ended.
        device: cpu, cuda, ... (default: cuda when available).
        quantize: int8 or int4: quantize a float checkpoint or HF directory while loading it (CPU; a
            checkpoint written by `convert --quantize` runs quantized without it)
    """
    for name, value in (("--max-tokens", max_tokens), ("--max-batch-size", max_batch_size),
                        ("--max-queue", max_queue)):
        if value is not None and value < 1:
            raise UserValueError(f"{name} {value} must be at least 1")
    if not request_timeout > 0:
        raise UserValueError(f"--request-timeout {request_timeout} must be a positive number of seconds")
    sock = bind(host, port)
    try:
        model, tokenizer, ckpt = load_for_inference(checkpoint, device, quantize)
        context = model.config.max_position_embeddings
        if max_tokens is not None and max_tokens >= context:
            raise UserValueError(f"--max-tokens {max_tokens} must be below the model's context of {context} tokens")
        settings = Settings(served_model_name or checkpoint, max_tokens or context - 1, api_key, request_timeout,
                            checkpoint_chat_template(ckpt))
    except BaseException:
        sock.close()
        raise
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
    app = make_app(OpenAIServer(engine, settings))
    bound = sock.getsockname()[1]
    print(f"serving {ckpt} as {settings.model_name!r} on http://{host}:{bound}/v1 (Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0
