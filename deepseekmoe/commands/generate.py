"""`deepseekmoe generate`: continue a prompt with a checkpoint, streaming the text to stdout."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ..errors import UserValueError
from ..inference.generate import TextStream, encode_prompt, generate, stdout_write
from ..inference.loading import load_for_inference
from ..inference.sampling import check_sampling
from ..model import Transformer


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text from --prompt, or from --prompt-file (a path, or '-' for stdin)."""
    if (prompt is None) == (prompt_file is None):
        raise UserValueError("give exactly one of --prompt TEXT or --prompt-file PATH ('-' reads stdin)")
    if prompt is not None:
        return prompt
    if prompt_file == "-":
        return sys.stdin.read()
    path = Path(prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    return path.read_text(encoding="utf-8", errors="replace")


def fit_new_tokens(model: Transformer, prompt_len: int, max_new_tokens: int) -> int:
    """max_new_tokens, lowered to what still fits the context; a prompt that does not fit is an error."""
    if max_new_tokens < 1:
        raise UserValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    limit = model.config.max_position_embeddings
    if prompt_len > limit:
        raise UserValueError(f"the prompt is {prompt_len} tokens long; the model's context is "
                         f"max_position_embeddings={limit} tokens")
    room = limit - prompt_len + 1
    if max_new_tokens > room:
        print(f"deepseekmoe: note: generating {room} tokens, all that fit max_position_embeddings={limit}",
              file=sys.stderr)
    return min(max_new_tokens, room)


def generate_command(checkpoint: str, *, prompt: str | None = None, prompt_file: str | None = None,
                     max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, device: str | None = None,
                     quantize: str | None = None, echo: bool = True) -> int:
    """Generate text from a trained model, streaming tokens to stdout as they are produced.

    Decodes with a KV cache (the prompt is processed once) and stops at the end-of-sequence token or after
    --max-new-tokens. Speed goes to stderr, so stdout holds only the text.

    Args:
        checkpoint: a checkpoint directory, or a run directory (its latest checkpoint is used)
        prompt: the text to continue
        prompt_file: read the prompt from this file ('-' for stdin) instead of --prompt
        max_new_tokens: tokens to generate at most (default 200; fewer if the context fills up)
        temperature: sampling temperature (default 0.8); 0 decodes greedily
        top_k: sample only among the k most likely tokens
        top_p: sample only from the smallest set of tokens whose probability reaches p
        seed: random seed, for reproducible samples
        device: cpu, cuda, cuda:1, ... (default: cuda when available)
        quantize: int8 or int4: quantize a float checkpoint or HF directory while loading it (CPU; a
            checkpoint written by `convert --quantize` runs quantized without it)
        echo: print the prompt before the generated text (default on)
    """
    check_sampling(temperature, top_k, top_p)
    text = read_prompt(prompt, prompt_file)
    model, tokenizer, _ = load_for_inference(checkpoint, device, quantize)
    ids = encode_prompt(tokenizer, text, model.config.bos_token_id)
    n = fit_new_tokens(model, len(ids), max_new_tokens)
    if echo:
        stdout_write(text)
    stream = TextStream(tokenizer)
    t0 = time.perf_counter()
    try:
        out = generate(model, ids, n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       eos_token_id=model.config.eos_token_id, stream=stream)
        stream.finish()
        stdout_write("\n")
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    elapsed = time.perf_counter() - t0
    print(f"[{len(out)} tokens in {elapsed:.2f} s, {len(out) / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0
