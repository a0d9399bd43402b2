"""Building blocks shared by dense layers and shared experts: RMSNorm, rotary embeddings, SwiGLU FFN; the decode
paths' shared parts.

Decoding runs a handful of token rows without gradients, where each aten op's fixed cost (dispatch, a view, an
allocation) outweighs its arithmetic. Calls like that (`decoding`) take shorter paths: the attention's q/k/v
projections as one matmul against their weights concatenated once (`FusedWeight`) and one rotary rotation for q and
k together (attention.py), and the routed experts' few-rows kernel (experts.py). They compute the same function as
the plain paths, whose bits training keeps; the fused matmul may round differently (tests/test_decode_paths.py).
Measured and left out (benchmarks/README.md): a FeedForward's gate/up as one matmul, RMSNorm as `F.rms_norm` (the
same bits on the CPU); both made a decode step slower. A module's `decode_path` attribute (True) turns its own off,
for A/B measurements (`Transformer.use_decode_paths`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


DECODE_MAX_ROWS = 16
"""Calls of at most this many token rows without gradients take the decode paths (decode batches; a prefill or an
evaluation batch has more rows and keeps the plain paths)."""
FUSED_MAX_BYTES = 8 << 20
"""Weights are concatenated for the decode paths up to this many bytes in all: larger matmuls are bound by reading
their weights, not by fixed costs, and keep the plain modules (and the CPU runtime's row blocks, runtime/linear.py)
without a second copy of their weights."""


def decoding(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a call on x (..., D) with these weights takes the decode paths: few rows, nothing to differentiate."""
    if x.numel() > DECODE_MAX_ROWS * x.shape[-1]:
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or any(w.requires_grad for w in weights))


class FusedWeight:
    """The concatenation (along the output dimension) of some weights, built on first use and built again when any
    of them is another tensor, holds other memory or was written in place (an optimizer step, `load_state_dict`,
    `model.to`, `param.data = ...`)."""

    def __init__(self) -> None:
        self._refs: tuple[weakref.ref, ...] = ()
        self._key: tuple = ()
        self._weight: torch.Tensor | None = None

    def get(self, *weights: torch.Tensor) -> torch.Tensor:
        key = tuple((w.data_ptr(), -1 if w.is_inference() else w._version) for w in weights)
        if key != self._key or any(ref() is not w for ref, w in zip(self._refs, weights)) or self._weight is None:
            with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable outside inference mode
                self._weight = torch.cat([w.detach() for w in weights])
            self._refs, self._key = tuple(weakref.ref(w) for w in weights), key
        return self._weight


def can_fuse(*weights: object) -> bool:
    """fp32 weights (not quantized ones) of at most FUSED_MAX_BYTES in all. In bf16 and fp16 the CPU runtime runs
    small-row matmuls weight-major (runtime/linear.py), faster there than x @ W^T, so those keep the plain
    modules."""
    return (all(isinstance(w, torch.Tensor) and w.dtype == torch.float32 for w in weights)
            and sum(w.nbytes for w in weights) <= FUSED_MAX_BYTES)  # type: ignore[union-attr]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as HF DeepSeek does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position tables (rotate-half layout, as in HF Llama/DeepSeek), built once for max_positions."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)build the tables; also after materialising a model built on the meta device."""
        device = self.cos.device
        if device.type == "meta":
            return
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        t = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_positions, head_dim)
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (S,) or (B, S) -> cos, sin of shape positions.shape + (head_dim,), float32."""
        return self.cos[positions], self.sin[positions]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, hd); cos/sin (S, hd), or (B, 1, S, hd) per row. Rotation in fp32, result in x's dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def apply_rotary_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary with fewer ops, for the model's own tables (RotaryEmbedding), whose sin has equal halves: then
    rotate_half(x) * sin = [-(x2 * s), x1 * s] = the halves of x swapped, times sin, the first half negated. The
    same bits as apply_rotary."""
    xf = x.float()
    rotated = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2).mul_(sin)
    rotated[..., :x.shape[-1] // 2].neg_()
    return (xf * cos).add_(rotated).to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). Dense layers and the (merged) shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
