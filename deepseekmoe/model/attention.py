"""Causal multi-head attention (GQA through num_key_value_heads) on PyTorch SDPA, with a static KV cache.

`start_pos` is an int (every row starts at the same absolute position) or a (B,) long tensor (row b starts at
start_pos[b]: sequences of different lengths decoded together, each in its own cache row, as a serving engine
does). With a tensor, the forward batch is the cache's first B rows and each query sees its own row's keys up to
its own position.

A decode call (layers.decoding) projects q, k and v with one matmul against their concatenated weights and rotates
q and k together (layers.apply_rotary_tables).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import UserValueError
from .layers import FusedWeight, apply_rotary, apply_rotary_tables, can_fuse, decoding


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: (B, H_kv, max_len, hd). Positions are written in place."""

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, S, hd) at positions [start, start+S); return all keys/values up to start+S.

        With a (B,) tensor `start`, row b is written at [start[b], start[b]+S) of cache row b, and the keys/values
        of the first B rows are returned up to the furthest end (the caller masks what lies past each row's own).
        """
        if isinstance(start, torch.Tensor):
            return self._update_rows(start, k, v)
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise UserValueError(f"KV cache holds {self.k.shape[2]} positions; asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def _update_rows(self, start_B: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = k.shape[0], k.shape[2]
        end = int(start_B.max()) + s
        if end > self.k.shape[2] or b > self.k.shape[0]:
            raise UserValueError(f"KV cache holds {self.k.shape[0]} rows of {self.k.shape[2]} positions; asked to "
                             f"write {b} rows up to {end}")
        pos_BS = start_B[:, None] + torch.arange(s, device=start_B.device)
        rows_B1 = torch.arange(b, device=start_B.device)[:, None]
        self.k[rows_B1, :, pos_BS] = k.transpose(1, 2)  # (B, S, H_kv, hd)
        self.v[rows_B1, :, pos_BS] = v.transpose(1, 2)
        return self.k[:b, :, :end], self.v[:b, :, :end]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst (compacting the rows in use)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h, hkv, hd = config.hidden_size, config.num_attention_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, hkv * hd, bias=False)
        self.v_proj = nn.Linear(d, hkv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        self.decode_path = True
        self._qkv = FusedWeight()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor = 0,
                cache: KVCache | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """key_mask (B, S_k) bool, True for real tokens: padding keys are hidden from every query."""
        b, s, _ = x.shape
        weights = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        if self.decode_path and can_fuse(*weights) and decoding(x, *weights):
            q, k, v = self._fused_qkv(x, cos, sin)
        else:
            q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
            k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
            v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        return self.o_proj(self.attend(q, k, v, start_pos, key_mask).transpose(1, 2).reshape(b, s, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
        """Scaled dot-product attention of q (B, H, S_q, hd) over k, v (B, Hkv, S_k, hd), causal at start_pos."""
        if isinstance(start_pos, torch.Tensor):
            return _per_row_sdpa(q, k, v, start_pos)
        if key_mask is None:
            return _causal_sdpa(q, k, v, start_pos)
        return _masked_sdpa(q, k, v, start_pos, key_mask)

    def _fused_qkv(self, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q, k and v (B, heads, S, hd) from one matmul and one rotation."""
        b, s, _ = x.shape
        h, hkv = self.num_heads, self.num_kv_heads
        weight = self._qkv.get(self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        qkv = F.linear(x, weight).view(b, s, h + 2 * hkv, self.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, S, hd)
        q, k = apply_rotary_tables(qkv[:, :h + hkv], cos, sin).split([h, hkv], dim=1)
        return q, k, qkv[:, h + hkv:]


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Query i sits at absolute position start_pos + i and sees keys at positions <= its own."""
    s_q, s_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if s_q == s_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if s_q == 1:  # one decode step: every cached key is visible
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    q_pos = torch.arange(start_pos, start_pos + s_q, device=q.device)[:, None]
    mask = q_pos >= torch.arange(s_k, device=q.device)[None, :]  # (S_q, S_k), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
                 key_mask: torch.Tensor) -> torch.Tensor:
    """Causal attention that also hides padding keys. Each query always sees itself, so a padding query never has
    an empty row (which would give NaN); real queries never see padding, so their outputs are unaffected."""
    s_q, s_k = q.shape[2], k.shape[2]
    q_pos = torch.arange(start_pos, start_pos + s_q, device=q.device)[:, None]
    k_pos = torch.arange(s_k, device=q.device)[None, :]
    mask = (q_pos >= k_pos) & key_mask[:, None, :s_k]  # (B, S_q, S_k)
    mask = mask | (q_pos == k_pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])


def _per_row_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_B: torch.Tensor) -> torch.Tensor:
    """Row b's query i sits at position start_B[b] + i and sees its row's keys at positions <= its own."""
    q_pos_BS = start_B[:, None] + torch.arange(q.shape[2], device=q.device)
    mask = q_pos_BS[:, :, None] >= torch.arange(k.shape[2], device=q.device)  # (B, S_q, S_k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])
