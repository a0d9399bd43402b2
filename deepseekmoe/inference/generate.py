"""Autoregressive generation over a static KV cache: prefill the prompt once, then decode one token at a time.

Shape legend: B batch, S prompt length, V vocabulary.

The prompt is run through the model once (optionally in chunks) to fill the caches; each later step feeds only the
newest token at its absolute position, so no position is ever recomputed. The decode loop itself never waits on
the device: `generate_tokens` yields token tensors, and only a consumer that needs a token on the host (streaming,
an eos check) reads it.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator, Sequence

import torch
from tokenizers import Tokenizer

from ..errors import UserValueError
from ..model import Transformer
from ..model.attention import KVCache
from .sampling import check_sampling, sample


def prefill(model: Transformer, prompt_BS: torch.Tensor, caches: list[KVCache],
            chunk_size: int | None = None) -> torch.Tensor:
    """Write the prompt's keys/values into the caches; return the logits (B, V) after its last token."""
    s = prompt_BS.shape[1]
    step = chunk_size or s
    logits = None
    for start in range(0, s, step):
        logits = model(prompt_BS[:, start:start + step], start_pos=start, kv_caches=caches).logits
    return logits[:, -1]


def decode_one_token(model: Transformer, token_B: torch.Tensor, pos: int, caches: list[KVCache]) -> torch.Tensor:
    """Feed one token per row at absolute position `pos`; return the next-token logits (B, V)."""
    return model(token_B[:, None], start_pos=pos, kv_caches=caches).logits[:, -1]


def check_length(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    """Generating N tokens after S prompt tokens feeds S + N - 1 positions; they must fit the model's context."""
    limit = model.config.max_position_embeddings
    if prompt_len < 1:
        raise UserValueError("the prompt is empty: give at least one token")
    if prompt_len + max_new_tokens - 1 > limit:
        raise UserValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"max_position_embeddings={limit}")


@torch.inference_mode()
def generate_tokens(model: Transformer, prompt_BS: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None,
                    prefill_chunk_size: int | None = None) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens next-token tensors (B,) for a batch of equal-length prompts (B, S), lazily."""
    b, s = prompt_BS.shape
    check_length(model, s, max_new_tokens)
    if max_new_tokens <= 0:
        return
    caches = model.new_kv_caches(b, s + max_new_tokens - 1)
    logits_BV = prefill(model, prompt_BS, caches, prefill_chunk_size)
    for i in range(max_new_tokens):
        token_B = sample(logits_BV, temperature, top_k, top_p, generator)
        yield token_B
        if i + 1 < max_new_tokens:
            logits_BV = decode_one_token(model, token_B, s + i, caches)


def generate(model: Transformer, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | None = None,
             stream: Callable[[int], None] | None = None, prefill_chunk_size: int | None = None) -> list[int]:
    """Continue one prompt; return the new token ids (ending with eos_token_id when it was produced).

    temperature 0 is greedy. `seed` makes sampling reproducible (a private generator; global RNG untouched).
    `stream`, when given, is called with each token id as soon as it is sampled.
    """
    device = model.embed_tokens.weight.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if prompt.dim() > 1:
        raise UserValueError(f"generate continues one prompt (1-D ids), got shape {tuple(prompt.shape)}; "
                         "generate_tokens decodes a batch")
    prompt_BS = prompt.reshape(1, -1)
    check_length(model, prompt_BS.shape[1], max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    steps = generate_tokens(model, prompt_BS, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator, prefill_chunk_size=prefill_chunk_size)
    if stream is None and eos_token_id is None:  # nothing needs a token on the host until the end
        return torch.cat(list(steps)).tolist() if max_new_tokens > 0 else []
    out: list[int] = []
    for token_B in steps:
        out.append(int(token_B[0]))
        if stream is not None:
            stream(out[-1])
        if out[-1] == eos_token_id:
            break
    return out


class TextStream:
    """Token ids in, text out as soon as it is complete: a character split over several byte-level tokens is held
    back until its last byte arrives.

    Each new piece is the decoding of the ids since `prefix` minus the decoding of those before `read`, so
    decoders that treat the first token specially (a leading-space marker) still print the right text.
    """

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], object] | None = None) -> None:
        self.tokenizer = tokenizer
        self.write = write or stdout_write
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _pending(self) -> tuple[str, str]:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return before, self.tokenizer.decode(self.ids[self.prefix:])

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        before, text = self._pending()
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.write(text[len(before):])
            self.prefix, self.read = self.read, len(self.ids)

    def finish(self) -> None:
        """Write whatever is still held back (an incomplete character decodes to U+FFFD)."""
        before, text = self._pending()
        if len(text) > len(before):
            self.write(text[len(before):])
        self.prefix = self.read = len(self.ids)


def stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def encode_prompt(tokenizer: Tokenizer, text: str, bos_token_id: int | None) -> list[int]:
    """Prompt ids as training saw documents begin: bos (when the model has one) then the text's tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([bos_token_id] if bos_token_id is not None else []) + ids
