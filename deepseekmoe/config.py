"""Model configuration: one dataclass with the HF DeepSeek field names, plus the paper's extras.

Paper notation (arXiv 2401.06066) -> fields:

    N    standard-size experts a conventional MoE layer would have
    m    fine-grained segmentation factor (each standard expert split into m)
    K    experts a conventional MoE layer would activate
    K_s  shared experts                     -> n_shared_experts
    mN - K_s  routed experts  (N')          -> n_routed_experts
    mK - K_s  activated routed experts (K') -> num_experts_per_tok
    F/m  expert hidden width                -> moe_intermediate_size
    alpha1 expert-level balance coefficient -> aux_loss_alpha
    alpha2 device-level balance coefficient -> device_aux_loss_alpha, over n_device_groups groups

`ModelConfig.from_paper(...)` builds a config from (N, m, K, K_s, F).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from .configio import check, field_types, from_data, read_mapping, require
from .errors import UserValueError

RouterKind = Literal["softmax_topk", "switch", "gshard", "hash", "none"]
ScoringFunc = Literal["softmax"]
ExpertsImpl = Literal["loop", "grouped"]

# HF config.json keys that carry no information for this model beyond fixed values we check.
HF_FIXED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "pretraining_tp": 1,
    "rope_scaling": None,
}
# Keys of the released deepseek-moe-16b config.json that describe how HF loads it (remote code), not the model.
HF_RELEASED = {
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",  # the version the remote modelling code targets
    "use_cache": True,
}
_HF_IGNORED = {
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "attention_dropout", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict",
}


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only DeepSeekMoE (or baseline) Transformer. Field names follow HF DeepSeek."""

    vocab_size: int = 8192
    """Vocabulary size."""
    hidden_size: int = 128
    """Model width d."""
    num_hidden_layers: int = 4
    """Number of Transformer blocks."""
    num_attention_heads: int = 4
    """Query heads; head_dim = hidden_size / num_attention_heads."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_attention_heads (MHA)."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary tables and KV cache are built for."""
    intermediate_size: int = 344
    """Hidden width of dense (non-MoE) SwiGLU FFN layers."""
    moe_intermediate_size: int = 86
    """Hidden width of one routed or shared expert."""
    n_routed_experts: int | None = 63
    """Routed experts per MoE layer (N' = mN - K_s); None means a dense model."""
    n_shared_experts: int = 1
    """Always-on shared experts per MoE layer (K_s); computed as one FFN of K_s x expert width."""
    num_experts_per_tok: int = 7
    """Routed experts activated per token (K' = mK - K_s)."""
    first_k_dense_replace: int = 0
    """The first k layers keep a dense FFN."""
    moe_layer_freq: int = 1
    """Layer i >= first_k_dense_replace is MoE iff i % moe_layer_freq == 0."""
    norm_topk_prob: bool = False
    """Renormalise the top-k gate weights to sum to 1 (the paper does not)."""
    scoring_func: ScoringFunc = "softmax"
    """Router scoring function (the paper uses softmax)."""
    aux_loss_alpha: float = 0.01
    """alpha1: expert-level balance loss coefficient."""
    seq_aux: bool = True
    """Compute the balance losses per sequence and average (True) or over the whole batch (False)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head."""
    initializer_range: float = 0.006
    """Std of the normal init for every weight matrix (paper: 0.006)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id, if any."""
    eos_token_id: int | None = None
    """End-of-sequence token id, if any."""
    router: RouterKind = "softmax_topk"
    """Routing: softmax_topk (DeepSeekMoE / generic top-k), switch (top-1), gshard (top-2), hash, none (dense)."""
    device_aux_loss_alpha: float = 0.0
    """alpha2: device-level balance loss coefficient (0 disables it)."""
    n_device_groups: int = 1
    """D: routed experts are split into D contiguous groups for the device-level loss."""
    z_loss_alpha: float = 0.0
    """Router z-loss coefficient (0 disables it)."""
    capacity_factor: float | None = None
    """Expert capacity = ceil(factor * T * K / E); None is dropless (as in all the paper's runs)."""
    hash_seed: int = 0
    """Seed of the fixed token-id -> expert table of the Hash router."""
    experts_impl: ExpertsImpl = "grouped"
    """Routed-expert implementation: loop (reference) or grouped (fast dispatch)."""

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.router != "none"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF rule: MoE iff routed experts exist, i >= first_k_dense_replace and i % moe_layer_freq == 0."""
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        for name, tp in field_types(type(self)).items():
            check(getattr(self, name), tp, name)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "intermediate_size", "moe_intermediate_size",
                     "moe_layer_freq", "n_device_groups"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        for name in ("n_shared_experts", "first_k_dense_replace"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        for name in ("aux_loss_alpha", "device_aux_loss_alpha", "z_loss_alpha", "initializer_range",
                     "rms_norm_eps"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "a number >= 0")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "a number > 0")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size", self.hidden_size,
                 f"a multiple of num_attention_heads={self.num_attention_heads}")
        require(self.head_dim % 2 == 0, "hidden_size", self.hidden_size,
                 "a value giving an even head_dim (rotary embeddings rotate pairs)")
        if self.num_key_value_heads is not None:
            require(self.num_key_value_heads >= 1
                     and self.num_attention_heads % self.num_key_value_heads == 0,
                     "num_key_value_heads", self.num_key_value_heads,
                     f"a divisor of num_attention_heads={self.num_attention_heads}")
        self._validate_routing()

    def _validate_routing(self) -> None:
        if self.router == "none":
            require(self.n_routed_experts is None, "n_routed_experts", self.n_routed_experts,
                     "None when router='none' (a dense model)")
            return
        require(self.n_routed_experts is not None and self.n_routed_experts >= 1, "n_routed_experts",
                 self.n_routed_experts, f"an integer >= 1 when router='{self.router}'")
        e, k = self.n_routed_experts, self.num_experts_per_tok
        require(k >= 1, "num_experts_per_tok", k, "an integer >= 1")
        if k > e:
            raise UserValueError(f"num_experts_per_tok={k} exceeds n_routed_experts={e}")
        fixed_k = {"switch": 1, "gshard": 2, "hash": 1}.get(self.router)
        if fixed_k is not None:
            require(k == fixed_k, "num_experts_per_tok", k, f"{fixed_k} for router='{self.router}'")
        require(e % self.n_device_groups == 0, "n_device_groups", self.n_device_groups,
                 f"a divisor of n_routed_experts={e}")
        if self.capacity_factor is not None:
            require(self.capacity_factor > 0, "capacity_factor", self.capacity_factor,
                     "a number > 0, or None for dropless routing")

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_paper(cls, *, num_experts: int, granularity: int, top_k: int, num_shared: int,
                   ffn_size: int, **kwargs: Any) -> "ModelConfig":
        """Build from the paper's notation: N standard experts of width F, split m-fold, K active, K_s shared.

        Derives n_routed_experts = mN - K_s, num_experts_per_tok = mK - K_s, moe_intermediate_size = F/m.
        """
        n, m, k, ks, f = num_experts, granularity, top_k, num_shared, ffn_size
        require(m >= 1, "granularity", m, "an integer >= 1")
        require(f % m == 0, "ffn_size", f, f"a multiple of granularity={m}")
        require(0 <= ks < m * k, "num_shared", ks, f"an integer in [0, m*K={m * k})")
        return cls(n_routed_experts=m * n - ks, num_experts_per_tok=m * k - ks, n_shared_experts=ks,
                   moe_intermediate_size=f // m, **kwargs)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        types_ = field_types(cls)
        unknown = sorted(set(d) - set(types_))
        if unknown:
            raise UserValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**{k: from_data(v, types_[k], k) for k, v in d.items()})

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json` (model_type 'deepseek') in the released checkpoints' form: their keys, sorted, with
        the remote-code `auto_map`; this project's extra fields ride along by name."""
        d = {"architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", **HF_FIXED, **HF_RELEASED}
        d.update(self.to_dict())
        if d["num_key_value_heads"] is None:
            d["num_key_value_heads"] = self.num_attention_heads
        return dict(sorted(d.items()))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read an HF DeepSeek `config.json` dict. Keys this model cannot honour raise ValueError."""
        mt = d.get("model_type", "deepseek")
        if mt != "deepseek":
            raise UserValueError(f"model_type={mt!r} is not supported (expected 'deepseek')")
        for key, expected in HF_FIXED.items():
            if key in d and d[key] != expected:
                raise UserValueError(f"{key}={d[key]!r} is not supported (expected {expected!r})")
        types_ = field_types(cls)
        known = set(types_)
        optional = {name for name, tp in types_.items() if type(None) in get_args(tp)}
        # a null for a non-optional field (remote-code style) means "use the default"
        kwargs = {k: v for k, v in d.items() if k in known and (v is not None or k in optional)}
        defaults = {"aux_loss_alpha": 0.001, "seq_aux": True, "n_shared_experts": 0,
                    "norm_topk_prob": False, "initializer_range": 0.02, "first_k_dense_replace": 0,
                    "moe_layer_freq": 1, "tie_word_embeddings": False, "rope_theta": 10000.0}
        for k, v in defaults.items():  # remote-code defaults for keys absent from config.json
            kwargs.setdefault(k, v)
        if "router" not in kwargs:
            kwargs["router"] = "softmax_topk" if d.get("n_routed_experts") is not None else "none"
        if kwargs.get("n_routed_experts") is None:
            kwargs["n_routed_experts"] = None
        if kwargs.get("num_key_value_heads") == kwargs.get("num_attention_heads"):
            kwargs["num_key_value_heads"] = None
        ignored = set(d) - known - _HF_IGNORED - set(HF_FIXED)
        ignored.discard("pad_token_id")
        if ignored:
            raise UserValueError(f"unsupported key(s) in config.json: {', '.join(sorted(ignored))}")
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write as JSON (.json) or YAML (anything else), as `load` reads them."""
        path = Path(path)
        text = _dump(self.to_dict(), path)
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read a file written by `save`, a recipe's `model` section, or an HF `config.json` (recognised by its
        model_type)."""
        d = read_mapping(path)
        if "model_type" in d or "architectures" in d:
            return cls.from_hf_dict(d)
        return cls.from_dict(d.get("model", d))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _dump(d: dict[str, Any], path: Path) -> str:
    if path.suffix == ".json":
        return json.dumps(d, indent=2) + "\n"
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
