"""Byte-level BPE tokenizers (HF `tokenizers`): training one, loading one, finding its special tokens.

Token ids are stored as uint16 when every id fits (vocabulary of at most 65,536), else uint32.
Documents are encoded without the tokenizer's own post-processing (`add_special_tokens=False`); the data pipeline
adds bos/eos itself, so a trained tokenizer and the official DeepSeek tokenizer behave the same way.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import UserValueError
from ..filenames import TOKENIZER_FILE

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
# names tried, in order, when reusing a tokenizer (ours, DeepSeek's, then common conventions)
BOS_NAMES = (BOS, "<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>")
EOS_NAMES = (EOS, "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|endoftext|>")
PAD_NAMES = (PAD, "<｜▁pad▁｜>", "<pad>", "<|padding|>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1  # the byte alphabet, the special tokens, at least one merge


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2), character -> byte: printable bytes stand for themselves, the other 68
    bytes are shifted to code points 256, 257, ... so every byte is one visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in set(printable))
    for n, b in enumerate(shifted):
        chars[chr(256 + n)] = b
    return chars


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (no prefix space; decoding restores the exact text)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ids 0, 1, 2 = bos, eos, pad, then the 256 byte symbols, then merges."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=sys.stderr.isatty(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (a file, or a directory that holds one)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no such tokenizer file: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # the Rust side raises a bare Exception on any parse error
        raise UserValueError(f"{p} is not a valid tokenizer.json: {str(exc).splitlines()[0]}") from None


def _first_id(tok: Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """bos/eos/pad ids, found by name. A tokenizer with only an end token (GPT-2 style) uses it for all three."""
    eos = _first_id(tok, EOS_NAMES)
    bos = _first_id(tok, BOS_NAMES)
    if eos is None:
        raise UserValueError(f"the tokenizer has no end-of-sequence token (looked for {', '.join(EOS_NAMES)})")
    bos = eos if bos is None else bos
    pad = _first_id(tok, PAD_NAMES)
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos if pad is None else pad}


def vocab_size_of(tok: Tokenizer) -> int:
    """One more than the largest id in use (the smallest embedding table that covers the tokenizer)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id < vocab_size fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
