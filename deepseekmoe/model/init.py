"""Weight initialisation and the fixed tables, for a whole Transformer or any part of one (a standalone MoE).

`init_weights` draws every weight matrix from N(0, std) in module order (paper: std 0.006; a tied LM head is drawn
twice, the second draw kept) and sets the norms to 1; `reset_tables` computes what is not a weight and not saved:
the rotary cos/sin and the hash routers' token -> expert tables. A model built on the meta device and given its
weights by `assign_weights` (read tensors become the parameters, nothing is copied) needs only the second.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import RoutedExperts
from .layers import RMSNorm, RotaryEmbedding
from .router import HashRouter, TopKRouter


@torch.no_grad()
def init_weights(module: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Every weight matrix below `module` ~ N(0, std), norms = 1, fixed tables rebuilt."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, TopKRouter)):
            m.weight.normal_(0.0, std, generator=generator)
        elif isinstance(m, RoutedExperts):
            m.gate_up_proj.normal_(0.0, std, generator=generator)
            m.down_proj.normal_(0.0, std, generator=generator)
        elif isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
    reset_tables(module)


def reset_tables(module: nn.Module, device: torch.device | str | None = None) -> None:
    """(Re)compute the rotary and hash-routing tables below `module`; with `device`, those still on the meta
    device (a model built there) are first allocated on it."""
    for m in module.modules():
        if device is not None:
            for name, buffer in list(m.named_buffers(recurse=False)):
                if buffer.is_meta:
                    setattr(m, name, torch.empty_like(buffer, device=device))
        if isinstance(m, (RotaryEmbedding, HashRouter)):
            m.reset()


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The tensors of `state` (every key of model.state_dict(), a tied LM head left out) become the model's
    weights as they are: assigned, not copied, so memory-mapped tensors stay mapped."""
    tied = model.config.tie_word_embeddings
    if tied:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
