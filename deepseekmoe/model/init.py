"""Weight initialisation and the fixed tables, for a whole Transformer or any part of one (a standalone MoE).

`init_weights` draws every weight matrix from N(0, std) in module order (paper: std 0.006; a tied LM head is drawn
twice, the second draw kept) and sets the norms to 1; `reset_tables` computes what is not a weight and not saved:
the rotary cos/sin and the hash routers' token -> expert tables. A model built on the meta device and given its
weights by `assign_weights` (read tensors become the parameters, nothing is copied) needs only the second.
`init_order` is the order of the draws, and `DrawsOnMeta` a meta-device build that advances the generator as a CPU
build does, for those that initialise only parts of each weight (`distributed.fsdp.init_shards`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from .experts import RoutedExperts
from .layers import RMSNorm, RotaryEmbedding
from .router import HashRouter, TopKRouter


def init_order(module: nn.Module) -> Iterator[tuple[nn.Module, str, bool]]:
    """(module, parameter name, drawn: N(0, std) if True, else 1) for every weight below `module`, in the order
    `init_weights` sets them (a tied LM head comes twice)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, TopKRouter)):
            yield m, "weight", True
        elif isinstance(m, RoutedExperts):
            yield m, "gate_up_proj", True
            yield m, "down_proj", True
        elif isinstance(m, RMSNorm):
            yield m, "weight", False


@torch.no_grad()
def init_weights(module: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """Every weight matrix below `module` ~ N(0, std), norms = 1, fixed tables rebuilt."""
    for m, name, drawn in init_order(module):
        weight = getattr(m, name)
        if drawn:
            weight.normal_(0.0, std, generator=generator)
        else:
            weight.fill_(1.0)
    reset_tables(module)


_RANDOM_FILLS = (torch.ops.aten.uniform_.default, torch.ops.aten.normal_.default)


class DrawsOnMeta(TorchDispatchMode):
    """Build on the meta device with the CPU generators advancing as a CPU build would: each random fill of a
    meta tensor (a layer's default initialisation, a standalone MoE's `init_weights`: see `drawing_on_meta`) is
    run on a CPU scratch tensor of its shape, then dropped, so at most one tensor is held. Use with
    `torch.device("meta")`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS and args[0].is_meta:
            func(torch.empty(args[0].shape, dtype=args[0].dtype, device="cpu"), *args[1:], **kwargs)
        return func(*args, **kwargs)


def drawing_on_meta() -> bool:
    """Whether a `DrawsOnMeta` build is under way: what a CPU build draws in a constructor, draw on meta too."""
    return any(isinstance(mode, DrawsOnMeta) for mode in _get_current_dispatch_mode_stack())


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
