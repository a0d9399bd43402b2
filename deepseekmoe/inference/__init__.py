"""Using a trained model: sampling functions and KV-cache generation."""

from .generate import TextStream, generate, generate_tokens
from .sampling import greedy, logits_to_probs, sample, top_k_filter, top_p_filter

__all__ = ["TextStream", "generate", "generate_tokens", "greedy", "logits_to_probs", "sample", "top_k_filter",
           "top_p_filter"]
