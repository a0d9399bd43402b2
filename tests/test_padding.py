"""Left padding with an attention mask gives the unpadded logits (the basis of batched serving)."""

import torch

from deepseekmoe import ModelConfig, Transformer


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, max_position_embeddings=32, initializer_range=0.2, **kw)
    return Transformer(cfg).eval()


@torch.no_grad()
def test_left_padded_batch_equals_unpadded_rows():
    for kw in ({}, {"num_key_value_heads": 2}):
        m = _model(**kw)
        a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 4))
        batch = torch.zeros(2, 7, dtype=torch.long)
        batch[0], batch[1, 3:] = a, b
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, :3] = False
        out = m(batch, attention_mask=mask).logits
        torch.testing.assert_close(out[0], m(a).logits[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 3:], m(b).logits[0], atol=2e-5, rtol=1e-5)
        assert torch.isfinite(out).all()


@torch.no_grad()
def test_left_padded_cached_decode_equals_full_forward():
    m = _model()
    b = torch.randint(0, 64, (1, 4))
    batch = torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)
    mask = torch.tensor([[False] * 3 + [True] * 4])
    caches = m.new_kv_caches(1, 16)
    m(batch, kv_caches=caches, attention_mask=mask)
    step = m(torch.tensor([[9]]), start_pos=7, kv_caches=caches,
             attention_mask=torch.cat([mask, torch.ones(1, 1, dtype=torch.bool)], 1)).logits
    full = m(torch.cat([b, torch.tensor([[9]])], 1)).logits
    torch.testing.assert_close(step[0, -1], full[0, -1], atol=2e-5, rtol=1e-5)
