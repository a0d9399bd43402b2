"""Per-request sampling parameters and the logits processing they ask for (vLLM's SamplingParams, in small).

Shape legend: V vocabulary. Processing works on one row of next-token logits (V,), in this order:
repetition penalty (prompt and output tokens), presence and frequency penalties (output tokens), logit_bias,
min_tokens (eos and stop_token_ids banned until that many tokens exist); then temperature, top_k, top_p and min_p
choose the token (temperature 0 is greedy). Log-probabilities reported to the client are always the model's own
log-softmax, before any of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import UserValueError
from .sampling import check_sampling, logits_to_probs, sample_from_probs


@dataclass(kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate (0 only scores the prompt)."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    """Keep tokens whose probability is at least min_p times the most likely one's."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated."""
    repetition_penalty: float = 1.0
    """Logits of tokens in the prompt or the output: positive ones divided by it, negative ones multiplied."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Text that ends the generation (not included in it)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end the generation (not included in the text), as eos does."""
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives."""
    prompt_logprobs: int | None = None
    """Report the prompt tokens' log-probabilities (and this many alternatives) too."""

    def check(self, vocab_size: int) -> None:
        """Raise ValueError naming the first setting out of range."""
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_tokens < 0 or self.min_tokens < 0:
            raise UserValueError(f"max_tokens={self.max_tokens} and min_tokens={self.min_tokens} must be >= 0")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise UserValueError(f"min_p={self.min_p} must be in [0, 1]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        bad = [t for t in [*self.logit_bias, *self.stop_token_ids] if not 0 <= t < vocab_size]
        if bad:
            raise UserValueError(f"token id {bad[0]} is outside the vocabulary of {vocab_size} tokens")

    @property
    def needs_history(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or self.min_tokens > 0)


def process_logits(logits_V: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                   banned_until_min: list[int]) -> torch.Tensor:
    """The logits after penalties, logit_bias and min_tokens (fp32; the input is left untouched)."""
    out = logits_V.float().clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=out.device)
        vals = out[seen]
        out[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output_ids and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=out.device), minlength=out.shape[0]).float()
        out -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    for token, bias in p.logit_bias.items():
        out[token] += bias
    if len(output_ids) < p.min_tokens and banned_until_min:
        out[banned_until_min] = float("-inf")
    return out


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """-inf for tokens whose probability is below min_p times the largest probability."""
    probs = logits.float().softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def choose_token(logits_V: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from processed logits: greedy at temperature 0, else sampled after the filters."""
    if p.temperature == 0:
        return int(logits_V.argmax())
    logits = logits_V / p.temperature
    if p.min_p:
        logits = min_p_filter(logits, p.min_p)
    probs = logits_to_probs(logits, 1.0, p.top_k, p.top_p)
    return int(sample_from_probs(probs[None], generator)[0])
