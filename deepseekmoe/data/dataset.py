"""Reading a prepared data directory: meta.json, memory-mapped token streams, training and evaluation batches.

A data directory (written by `deepseekmoe prepare`):
    meta.json        format, vocab_size, dtype, bos/eos/pad ids, tokenizer hash, sources, per-split counts
    tokenizer.json   the byte-level BPE tokenizer
    train.bin        flat token stream (dtype from meta.json); each document is bos + tokens + eos
    val.bin          the same for the validation documents

Training batches are non-overlapping windows of seq_len + 1 tokens (inputs = window[:-1], targets = window[1:]).
`PackedBatches.batch(i)` is a pure function of (seed, i): sample j = i * batch_size + b is window
perm_e[j mod W] of epoch e = j // W, where W is the number of windows and perm_e a permutation seeded by
(seed, e); each epoch also shifts the window grid by a seeded offset inside the tokens left over. So resuming
needs only the next batch index, and within an epoch no window is used twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserValueError
from ..filenames import META_FILE, TOKEN_FILES

FORMAT = 1
SPLITS = tuple(TOKEN_FILES)


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a data directory; FileNotFoundError / ValueError (one line) when it is not one."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} is not a data directory (no {META_FILE}); "
                                "create one with `deepseekmoe prepare`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserValueError(f"{path}: unsupported data format {found!r} (this version reads format {FORMAT})")
    missing = [k for k in ("vocab_size", "dtype", "splits") if k not in meta]
    splits = meta.get("splits")
    whole = isinstance(splits, dict) and all(isinstance(splits.get(s), dict) and "tokens" in splits[s]
                                             for s in ("train", "val"))
    if not missing and not whole:
        missing = ["splits.train.tokens / splits.val.tokens"]
    if missing:
        raise UserValueError(f"{path} lacks {', '.join(missing)}; recreate the directory with `deepseekmoe prepare`")
    return meta


def open_split(data_dir: str | Path, split: str) -> np.ndarray:
    """The token stream of one split as a read-only 1-D memmap (an empty array for an empty split)."""
    if split not in SPLITS:
        raise UserValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    path = Path(data_dir) / TOKEN_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `deepseekmoe prepare` again")
    expected = meta["splits"][split]["tokens"]
    size = path.stat().st_size
    if size != expected * dtype.itemsize:
        raise UserValueError(f"{path} holds {size} bytes, meta.json promises {expected} {dtype} tokens; "
                         "the directory is damaged, run `deepseekmoe prepare --force`")
    if expected == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _windows_error(tokens: np.ndarray, window: int, what: str) -> UserValueError:
    return UserValueError(f"{what} of {len(tokens)} tokens is too small for one window of {window} tokens "
                      f"(seq_len + 1); use a shorter seq_len or more text")


class PackedBatches:
    """Deterministic training batches: `batch(index)` depends only on (seed, index); see the module docstring."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> None:
        if batch_size < 1 or seq_len < 1:
            raise UserValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.window = seq_len + 1
        self.num_windows = len(tokens) // self.window
        if self.num_windows == 0:
            raise _windows_error(tokens, self.window, "the training split")
        self._spare = len(tokens) - self.num_windows * self.window
        self._epoch_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def batches_per_epoch(self) -> float:
        return self.num_windows / self.batch_size

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """(grid offset, window permutation) of one epoch, cached for the last two epochs used."""
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self._spare + 1))
            perm = rng.permutation(self.num_windows)
            if len(self._epoch_cache) >= 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = (offset, perm)
        return self._epoch_cache[epoch]

    def window_starts(self, index: int) -> list[int]:
        """Token offsets of the windows that make batch `index`."""
        if index < 0:
            raise UserValueError(f"batch index must be >= 0, got {index}")
        starts = []
        for sample in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, pos = divmod(sample, self.num_windows)
            offset, perm = self._epoch(epoch)
            starts.append(offset + int(perm[pos]) * self.window)
        return starts

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 tensors of shape (batch_size, seq_len); targets are inputs shifted by one."""
        rows = np.stack([self.tokens[s:s + self.window] for s in self.window_starts(index)]).astype(np.int64)
        data = torch.from_numpy(rows)  # (B, S + 1)
        return data[:, :-1], data[:, 1:]


def check_eval_windows(tokens: np.ndarray, seq_len: int, what: str = "the evaluation split") -> int:
    """The number of evaluation windows of `seq_len` in `tokens`; ValueError when there is not even one."""
    num_windows = (len(tokens) - 1) // seq_len
    if num_windows < 1:
        raise _windows_error(tokens, seq_len + 1, what)
    return num_windows


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential evaluation batches (inputs, targets), int64 (b, seq_len) with b <= batch_size in the last one.

    Window k holds tokens[k*seq_len : k*seq_len + seq_len + 1]: the inputs do not overlap and every token after the
    first is a target exactly once, up to the last full window (the few tokens after it are not scored).
    """
    if batch_size < 1 or seq_len < 1:
        raise UserValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    num_windows = check_eval_windows(tokens, seq_len)
    for n, first in enumerate(range(0, num_windows, batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        rows = [tokens[k * seq_len:k * seq_len + seq_len + 1] for k in range(first, min(first + batch_size,
                                                                                          num_windows))]
        data = torch.from_numpy(np.stack(rows).astype(np.int64))  # (b, S + 1)
        yield data[:, :-1], data[:, 1:]
