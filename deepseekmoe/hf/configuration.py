"""`DeepseekConfig`: the transformers config for model_type "deepseek", a thin shell around `ModelConfig`.

The fields are the released config.json's (defaults: deepseek-moe-16b, SPEC.md section 7) plus this project's
extras under their `ModelConfig` names. `to_model_config()` turns it into the `ModelConfig` the model code runs
on, through `ModelConfig.from_hf_dict`, so values the model cannot honour fail at construction with that
function's error.
"""

from __future__ import annotations

from dataclasses import fields

from transformers import PretrainedConfig

from ..config import ModelConfig

# config.json keys whose only allowed value is fixed (checked by ModelConfig.from_hf_dict).
_FIXED_KEYS = ("hidden_act", "attention_bias", "pretraining_tp", "rope_scaling")


class DeepseekConfig(PretrainedConfig):
    model_type = "deepseek"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # this project's extras (ModelConfig names and defaults)
    router: str | None = None
    device_aux_loss_alpha: float = 0.0
    n_device_groups: int = 1
    z_loss_alpha: float = 0.0
    capacity_factor: float | None = None
    hash_seed: int = 0
    experts_impl: str = "grouped"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        model_config = self.to_model_config()  # validates now, with ModelConfig's messages
        self.router = model_config.router  # saved concretely: softmax_topk for MoE configs, none for dense ones

    def to_model_config(self) -> ModelConfig:
        names = [f.name for f in fields(ModelConfig)] + list(_FIXED_KEYS)
        d = {name: getattr(self, name) for name in names if getattr(self, name, None) is not None}
        if self.n_routed_experts is None:
            d.pop("num_experts_per_tok", None)
        return ModelConfig.from_hf_dict({"model_type": "deepseek", **d})

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> "DeepseekConfig":
        d = config.to_hf_dict()
        for key in ("architectures", "model_type", "torch_dtype"):
            d.pop(key, None)
        return cls(**d, **kwargs)
