"""Sampling as small pure functions: logits -> (temperature, top-k, top-p) -> probabilities -> one token.

Shape legend: B batch, V vocabulary. Every function takes next-token logits (B, V) (or (V,)) and works along the
last dimension. Filters replace excluded logits with -inf, so they compose in any order; `logits_to_probs` applies
them in the usual order: temperature, then top-k, then top-p on what is left.
"""

from __future__ import annotations

import math

import torch
from ..errors import UserValueError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the first out-of-range setting."""
    if not math.isfinite(temperature) or temperature < 0:
        raise UserValueError(f"temperature={temperature} must be a finite number >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise UserValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also refuses nan
        raise UserValueError(f"top_p={top_p} must be in (0, 1]")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in fp32. temperature must be > 0 (0 means greedy: use `greedy` instead)."""
    if temperature <= 0:
        raise UserValueError(f"temperature={temperature} must be > 0 to sample (0 means greedy decoding)")
    return logits.float() / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits (ties broken by torch.topk), -inf elsewhere."""
    if k < 1:
        raise UserValueError(f"top_k={k} must be >= 1")
    if k >= logits.shape[-1]:
        return logits
    values, idx = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p (the nucleus), -inf elsewhere.

    A token is kept when the probability mass of the tokens ranked strictly above it is still below p, so the most
    likely token is always kept and the set stops at the first token that makes the sum reach p.
    """
    if not 0.0 < p <= 1.0:
        raise UserValueError(f"top_p={p} must be in (0, 1]")
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.float().softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_above >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Next-token distribution (fp32) after temperature, top-k and top-p."""
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits.softmax(dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token ids: (B, V) -> (B,)."""
    return logits.argmax(dim=-1)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row: (B, V) -> (B,).

    argmax(probs / E) with E ~ Exp(1) i.i.d. picks token i with probability probs_i (the exponential race), and
    unlike torch.multinomial it never waits on the device. probs must be fp32 (as logits_to_probs returns).
    """
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # a draw of exactly 0 would make 0/0 = nan win the argmax
    return (probs / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids from logits (B, V) -> (B,); temperature 0 is greedy (top-k / top-p then change nothing)."""
    if temperature == 0:
        return greedy(logits)
    return sample_from_probs(logits_to_probs(logits, temperature, top_k, top_p), generator)
