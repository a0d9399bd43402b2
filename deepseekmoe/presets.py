"""Named model configurations: the paper's models, its 2B-scale baselines and ablations, and CPU-sized copies.

Every validation family is built the way the paper builds Table 1 / Table 2 / Figure 3: one "standard FFN" width F
and N = 16 standard experts, so that
  * Hash, Switch (top-1 of 16) and Dense share activated parameters (1 x F per layer),
  * GShard (top-2 of 16) and DeepSeekMoE (1 shared + 7 of 63 at F/4) share activated parameters (2 x F),
  * every MoE variant has the same total expert parameters (16 x F per layer).

Choices where the paper is silent ([U] in SPEC.md), all overridable:
  * 2B standard FFN width F = 3416 (~8/3 x 1280, a multiple of 8): gives 1.89B / 0.24B total / activated expert
    params, as the paper's Table 2 prints. Vocabulary 8192, untied head.
  * 145B dense first-layer width 21888 (2 x the 16B's 10944): gives the paper's 144.6B total.
  * Hash / Switch use 16 standard experts ("same total params" as GShard).
"""

from __future__ import annotations

from typing import Any, Callable

from .config import ModelConfig
from .errors import UserError

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register(name: str, factory: Callable[[], ModelConfig]) -> None:
    _PRESETS[name] = factory


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def load_preset(name: str) -> ModelConfig:
    """Return a fresh ModelConfig for a named preset; an unknown name is a UserError listing the choices."""
    if name not in _PRESETS:
        raise UserError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return _PRESETS[name]()


# ------------------------------------------------------------------ the paper's released / reported models
def _deepseekmoe_16b() -> ModelConfig:
    """deepseek-moe-16b-base config.json, field for field (aux_loss_alpha/seq_aux: remote-code defaults)."""
    return ModelConfig(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=None, max_position_embeddings=4096, intermediate_size=10944,
        moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
        aux_loss_alpha=0.001, seq_aux=True, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.02, bos_token_id=100000, eos_token_id=100001,
    )


def _deepseekmoe_145b() -> ModelConfig:
    return ModelConfig(
        vocab_size=102400, hidden_size=4096, num_hidden_layers=62, num_attention_heads=32,
        max_position_embeddings=4096, intermediate_size=21888, moe_intermediate_size=1408,
        n_routed_experts=128, n_shared_experts=4, num_experts_per_tok=12, first_k_dense_replace=1,
        aux_loss_alpha=0.003, device_aux_loss_alpha=0.05, n_device_groups=4,
        bos_token_id=100000, eos_token_id=100001,
    )


def _dense_7b(vocab: int, layers: int) -> Callable[[], ModelConfig]:
    """DeepSeek 7B / LLaMA2 7B, for the paper's FLOPs comparison (Tables 3-4)."""
    return lambda: ModelConfig(
        vocab_size=vocab, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32,
        max_position_embeddings=4096, intermediate_size=11008, n_routed_experts=None, router="none",
    )


register("deepseekmoe-16b", _deepseekmoe_16b)
register("deepseekmoe-145b", _deepseekmoe_145b)
register("deepseek-7b", _dense_7b(102400, 30))
register("llama2-7b", _dense_7b(32000, 32))


# ------------------------------------------------------------------ validation families (Tables 1-2, Fig. 3)
def _variants(ffn: int) -> dict[str, Callable[[dict[str, Any]], ModelConfig]]:
    """Suffix -> factory over a family's shared fields, for a family whose standard FFN width is `ffn` (N = 16
    standard experts): the MoE models in the paper's notation, through ModelConfig.from_paper."""
    def moe(m: int, k: int, ks: int, size: float = 1.0, **kw: Any) -> Callable[[dict[str, Any]], ModelConfig]:
        return lambda base: ModelConfig.from_paper(num_experts=16, granularity=m, top_k=k, num_shared=ks,
                                                   ffn_size=round(ffn * size), **{**base, **kw})

    def dense(mult: int) -> Callable[[dict[str, Any]], ModelConfig]:
        return lambda base: ModelConfig(**{**base, "intermediate_size": ffn * mult, "aux_loss_alpha": 0.0},
                                        router="none", n_routed_experts=None, n_shared_experts=0,
                                        num_experts_per_tok=1)

    return {
        "dense": dense(1),
        "hash": moe(1, 1, 0, router="hash", aux_loss_alpha=0.0),
        "switch": moe(1, 1, 0, router="switch"),
        "gshard": moe(1, 2, 0, router="gshard"),
        "deepseekmoe": moe(4, 2, 1),
        # Table 2: larger baselines
        "gshard-x1.2": moe(1, 2, 0, size=1.2, router="gshard"),
        "gshard-x1.5": moe(1, 2, 0, size=1.5, router="gshard"),
        "dense-x4": dense(4),
        "dense-x16": dense(16),
        # Figure 3 ablation: (a) gshard, (b) + shared isolation, (c) + m=2, (d) + m=4 = deepseekmoe
        "ablation-shared": moe(1, 2, 1),
        "ablation-m2": moe(2, 2, 1),
        # shared-expert ratio (64 experts of F/4, 8 activated): 1 shared = deepseekmoe
        "shared2": moe(4, 2, 2),
        "shared4": moe(4, 2, 4),
        # Figure 6: half the activated routed experts
        "deepseekmoe-half": moe(4, 1, 1),
    }


def _family(prefix: str, base: dict[str, Any], ffn: int, names: dict[str, str] | None = None) -> None:
    for suffix, build in _variants(ffn).items():
        name = (names or {}).get(suffix, f"{prefix}-{suffix}")
        register(name, lambda b=build: b({**base, "intermediate_size": ffn}))


_2B = dict(vocab_size=8192, hidden_size=1280, num_hidden_layers=9, num_attention_heads=10,
           max_position_embeddings=2048, aux_loss_alpha=0.01, first_k_dense_replace=0)
_family("2b", _2B, 3416, names={"deepseekmoe": "deepseekmoe-2b", "dense": "dense-0.2b"})

# CPU scale: the same recipe at hidden 128 (tiny, ~11M total) and hidden 384 (small, ~120M total).
_TINY = dict(vocab_size=8192, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=512, aux_loss_alpha=0.01, first_k_dense_replace=0)
_family("tiny", _TINY, 344)
_SMALL = dict(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
              max_position_embeddings=1024, aux_loss_alpha=0.01, first_k_dense_replace=0)
_family("small", _SMALL, 1024)
