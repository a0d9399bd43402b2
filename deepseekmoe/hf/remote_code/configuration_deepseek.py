"""DeepseekConfig: the config.json of a DeepSeekMoE (DeepSeek v1, model_type "deepseek") checkpoint.

The fields are the released deepseek-moe-16b config.json's (and its defaults), plus the deepseekmoe extras a
checkpoint of that project may carry: `router` (softmax_topk, switch and gshard are top-k softmax routers, hash a
fixed token-id table, none a dense model), `capacity_factor` (None: dropless), `hash_seed`, the device-level
balance loss (`device_aux_loss_alpha` over `n_device_groups`), `z_loss_alpha`, and `experts_impl` (which kernel
deepseekmoe itself runs; it does not change the math).
"""

from __future__ import annotations

from transformers import PretrainedConfig

AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    "AutoModelForSequenceClassification": "modeling_deepseek.DeepseekForSequenceClassification",
}
ROUTERS = ("softmax_topk", "switch", "gshard", "hash", "none")
_TOP_K = {"switch": 1, "gshard": 2}


class DeepseekConfig(PretrainedConfig):
    model_type = "deepseek"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    # fields: written from deepseekmoe.config.ModelConfig by deepseekmoe/convert/hf_config.py
    vocab_size: int = 102400
    hidden_size: int = 2048
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    max_position_embeddings: int = 4096
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    rms_norm_eps: float = 1e-06
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    router: str | None = None
    device_aux_loss_alpha: float = 0.0
    n_device_groups: int = 1
    z_loss_alpha: float = 0.0
    capacity_factor: float | None = None
    hash_seed: int = 0
    experts_impl: str = "grouped"
    hidden_act: str = "silu"
    attention_bias: bool = False
    pretraining_tp: int = 1
    rope_scaling: dict | None = None
    attention_dropout: float = 0.0
    use_cache: bool = True
    pad_token_id: int | None = None
    # end of fields

    def __post_init__(self, **kwargs):
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.router is None:
            self.router = "none" if self.n_routed_experts is None else "softmax_topk"
        self._check()

    def _check(self) -> None:
        fixed = {"hidden_act": "silu", "attention_bias": False, "pretraining_tp": 1, "rope_scaling": None,
                 "scoring_func": "softmax"}
        for key, value in fixed.items():
            if getattr(self, key) != value:
                raise ValueError(f"{key}={getattr(self, key)!r} is not supported (expected {value!r})")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size={self.hidden_size}, num_attention_heads={self.num_attention_heads} and "
                             f"num_key_value_heads={self.num_key_value_heads} do not divide")
        if (self.router == "none") != (self.n_routed_experts is None):
            raise ValueError(f"router={self.router!r} does not fit n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts is not None:
            k = self.num_experts_per_tok
            if k is None or not 1 <= k <= self.n_routed_experts:
                raise ValueError(f"num_experts_per_tok={k} exceeds n_routed_experts={self.n_routed_experts} "
                                 "or is below 1")
            if _TOP_K.get(self.router, k) != k or (self.router == "hash" and k != 1):
                raise ValueError(f"router={self.router!r} does not route num_experts_per_tok={k} experts")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)
