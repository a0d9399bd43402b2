"""Cached decoding equals the full forward: prefill in chunks + one token at a time vs one pass over the sequence."""

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.inference.generate import decode_one_token, prefill
from deepseekmoe.model.attention import KVCache

VARIANTS = {
    "moe": {},
    "moe-first-dense": {"first_k_dense_replace": 1},
    "dense": {"router": "none", "n_routed_experts": None, "n_shared_experts": 0, "num_experts_per_tok": 1},
    "hash": {"router": "hash", "num_experts_per_tok": 1, "n_shared_experts": 0, "aux_loss_alpha": 0.0},
    "gqa": {"num_key_value_heads": 2},
    "mqa-gshard": {"num_key_value_heads": 1, "router": "gshard"},
}


def _cached_logits(model: Transformer, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits for every position, computed chunk by chunk through one static cache."""
    caches = model.new_kv_caches(ids.shape[0], ids.shape[1])
    out, start = [], 0
    for size in chunks:
        out.append(model(ids[:, start:start + size], start_pos=start, kv_caches=caches).logits)
        start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_chunked_and_stepwise_cache_equals_full_forward(make_config, variant):
    model = Transformer(make_config(**VARIANTS[variant])).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    full = model(ids).logits
    # a multi-token prefill, a chunk that attends to cached keys under a causal mask, then single tokens
    cached = _cached_logits(model, ids, [5, 4, 1, 1, 1, 1])
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert not torch.equal(full[:, 0], full[:, 1])  # the positions differ, so the comparison means something


@torch.no_grad()
def test_prefill_and_decode_helpers_match_full_forward(make_config):
    model = Transformer(make_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    full = model(ids).logits
    caches = model.new_kv_caches(1, 10)
    last = prefill(model, ids[:, :7], caches, chunk_size=3)
    torch.testing.assert_close(last, full[:, 6], atol=1e-5, rtol=1e-5)
    for pos in range(7, 10):
        step = decode_one_token(model, ids[:, pos], pos, caches)
        torch.testing.assert_close(step, full[:, pos], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_keeps_written_positions_and_refuses_overflow():
    cache = KVCache(1, 2, 4, 3, torch.float32)
    k, v = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    keys, values = cache.update(0, k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)
    k1 = torch.randn(1, 2, 1, 3)
    keys, _ = cache.update(3, k1, k1)
    assert torch.equal(keys, torch.cat([k, k1], dim=2))
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(4, k1, k1)
