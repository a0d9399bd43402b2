"""Shared test helpers: a tiny debug config factory (torchtitan habit: one tiny model used by every test)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from deepseekmoe import ModelConfig


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


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
