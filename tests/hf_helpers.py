"""Helpers for the transformers tests: a tiny random DeepSeekMoE checkpoint with a trained byte-level tokenizer,
exported with `convert --to-hf` (several shards, an index, the remote code and the tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.convert.hf_export import convert_to_hf
from deepseekmoe.data.tokenizer import train_tokenizer
from deepseekmoe.checkpoint import save_model

CORPUS = ["The quick brown fox jumps over the lazy dog.", "A cat sat on the mat and looked at the bird.",
          "User: hello there\n\nAssistant: general kenobi", "Rain fell on the green hills."] * 20
VOCAB = 300


def tiny_hf_config(**overrides) -> ModelConfig:
    """3 layers (one dense, two MoE), GQA (4 heads, 2 kv heads), 6 routed experts, top-2, 1 shared."""
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6,
                n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, initializer_range=0.2,
                bos_token_id=0, eos_token_id=1)
    return ModelConfig(**{**base, **overrides})


def export_tiny(root: Path, config: ModelConfig | None = None, seed: int = 0,
                max_shard_size: int = 200_000) -> tuple[Transformer, Path]:
    """(our model in eval mode, its HF export directory) for a random model of `config` (default tiny_hf_config())."""
    root.mkdir(parents=True, exist_ok=True)
    train_tokenizer(CORPUS, VOCAB).save(str(root / "tokenizer.json"))
    torch.manual_seed(seed)
    model = Transformer(config or tiny_hf_config()).eval()
    save_model(model, root / "ckpt", tokenizer_path=root / "tokenizer.json")
    convert_to_hf(root / "ckpt", root / "hf", max_shard_size=max_shard_size)
    index = root / "hf" / "model.safetensors.index.json"
    assert not index.is_file() or len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    return model, root / "hf"
