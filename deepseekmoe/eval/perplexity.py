"""Held-out loss, perplexity and bits per byte: the eval command's and the trainer's validation alike (`score`).

What is counted. The token stream is cut into consecutive windows of S + 1 tokens that overlap by one token
(`deepseekmoe.data.dataset.eval_batches`, the same windows as the trainer's validation): window i feeds tokens
[i*S, i*S + S) and predicts tokens [i*S + 1, i*S + S + 1), so every token after the first is predicted once, with
the context of its own window only, up to the last full window (the < S tokens after it are not scored; a stream
shorter than one window is evaluated as a single shorter window). --max-batches evaluates a prefix.

  loss           mean cross-entropy over those predicted tokens, in nats per token (bos/eos predictions included:
                 ending a document is part of modelling the text)
  perplexity     exp(loss)
  bits_per_byte  sum of the nats / (ln 2 * bytes), where bytes = the UTF-8 bytes of the predicted tokens (special
                 tokens count 0 bytes): exactly the text those tokens spell, however much of the stream is scored.
                 When every token is scored this is the text's UTF-8 length (the one unscored token, the first, is
                 bos: 0 bytes); the tokens after the last full window and the text they spell are left out alike.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders

from ..data.dataset import eval_batches
from ..data.tokenizer import byte_level_alphabet
from ..errors import UserValueError
from ..model import Transformer


@dataclass
class EvalResult:
    loss: float
    """Mean nats per predicted token."""
    tokens: int
    """Predicted tokens."""
    bytes: int
    """UTF-8 bytes of the predicted tokens."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens / (self.bytes * math.log(2)) if self.bytes else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """(V,) int64: the UTF-8 bytes each token id stands for; special tokens 0.

    Byte-level BPE tokens spell one byte per character, so a token that holds part of a multi-byte character is
    still counted exactly; other tokenizers fall back to the length of the token's own decoding.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    alphabet = byte_level_alphabet() if isinstance(tokenizer.decoder, decoders.ByteLevel) else {}
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    for token, i in vocab.items():
        if i in special:
            continue
        if alphabet and all(ch in alphabet for ch in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return lengths


def score(model: Transformer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], byte_lengths: np.ndarray,
          autocast: ContextManager | None = None) -> EvalResult:
    """Summed nats, predicted tokens and their UTF-8 bytes (`byte_lengths`: token_byte_lengths) over (inputs,
    targets) batches; under `autocast` where given. Gradients are the caller's to switch off."""
    device = model.embed_tokens.weight.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = n_bytes = 0
    for inputs, targets in batches:
        with autocast or nullcontext():
            logits = model(inputs.to(device)).logits
        nats += F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
        count += targets.numel()
        n_bytes += int(byte_lengths[targets.numpy()].sum())
    return EvalResult(loss=nats.item() / count, tokens=count, bytes=n_bytes)


@torch.inference_mode()
def evaluate(model: Transformer, tokens: np.ndarray, byte_lengths: np.ndarray, *, batch_size: int = 8,
             seq_len: int = 512, max_batches: int | None = None, progress: bool = False) -> EvalResult:
    """Loss, token and byte counts of `model` over a flat token stream (see the module docstring)."""
    if len(tokens) < 2:
        raise UserValueError(f"held-out text has {len(tokens)} token(s); need at least 2 to predict one")
    if seq_len > model.config.max_position_embeddings:
        raise UserValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")

    seq_len = min(seq_len, len(tokens) - 1)
    if int(tokens.max()) >= model.config.vocab_size:
        raise UserValueError(f"held-out text holds token id {int(tokens.max())}, beyond the model's "
                         f"vocab_size={model.config.vocab_size}")
    total = -(-((len(tokens) - 1) // seq_len) // batch_size)
    total = min(total, max_batches) if max_batches is not None else total
    batches = _progress(eval_batches(tokens, batch_size, seq_len, max_batches), total, progress)
    return score(model, batches, byte_lengths)


def _progress(batches: Iterable, total: int, enabled: bool) -> Iterable:
    if not enabled:
        return batches
    from tqdm import tqdm
    return tqdm(batches, total=total, desc="eval", unit="batch", file=sys.stderr, disable=None)
