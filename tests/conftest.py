"""Shared test helpers: a tiny debug config factory (torchtitan habit: one tiny model used by every test)."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch

from deepseekmoe import ModelConfig


# The released deepseek-moe-16b-base config.json, field for field, in the file's order (SPEC.md section 7).
RELEASED_16B_CONFIG = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}


def tiny_config(**overrides: Any) -> ModelConfig:
    """A model small enough for any CPU test: 2 layers, d=32, 8 routed experts of width 16, top-2, 1 shared."""
    base: dict[str, Any] = dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, initializer_range=0.2,
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    return tiny_config


@pytest.fixture
def released_16b_config() -> dict[str, Any]:
    return copy.deepcopy(RELEASED_16B_CONFIG)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
