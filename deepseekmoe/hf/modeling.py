"""`DeepseekForCausalLM`: a transformers `PreTrainedModel` + `GenerationMixin` that runs our `Transformer`.

Design:
  * `self.model` is our `Transformer` with its LM head swapped for `nn.Identity` (so its output "logits" are the
    final-norm hidden states) and `self.lm_head` sits at the top, as in every HF causal LM. Parameter names are
    therefore the HF ones (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`, ...) except for the
    routed experts, which we keep stacked (`model.layers.N.mlp.experts.gate_up_proj` [E, 2F, D], `down_proj`
    [E, D, F]).
  * The per-expert HF keys <-> stacked tensors mapping is a transformers checkpoint conversion mapping
    registered for model_type "deepseek" (`EXPERT_CONVERSIONS`, the same merge transformers uses for its own
    MoE models): `from_pretrained` stacks on load, `save_pretrained` splits on save, so files keep the
    official layout.
  * Generation: transformers hands over a `Cache` (a `DynamicCache` by default); `_LayerCache` lets our attention
    write into it through the same `update(start, k, v)` call our own static cache answers. The 2-D
    `attention_mask` is passed to our model as a key mask (left padding works; rotary attention depends only on
    relative positions, so no position ids are needed).
  * Loss: the usual shifted cross-entropy (`self.loss_function`, which honours `ignore_index` and
    `num_items_in_batch`), plus, in training mode, the configured balance losses (expert-level, device-level,
    z-loss), as the original remote code adds its auxiliary loss only while training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..losses import auxiliary_losses
from ..model import Transformer
from ..model.experts import RoutedExperts
from ..model.layers import RMSNorm, RotaryEmbedding
from ..model.router import HashRouter, RouterOutput, TopKRouter
from .configuration import DeepseekConfig


def expert_conversions() -> list[WeightConverter]:
    """HF per-expert tensors <-> our stacked experts (gate rows first, then up rows)."""
    return [
        WeightConverter(source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                        target_patterns="mlp.experts.gate_up_proj",
                        operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
        WeightConverter(source_patterns="mlp.experts.*.down_proj.weight", target_patterns="mlp.experts.down_proj",
                        operations=[MergeModulelist(dim=0)]),
    ]


class _LayerCache:
    """One layer's view of a transformers `Cache`, answering our attention's `update(start, k, v)`."""

    def __init__(self, cache: Cache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, self.layer_idx)


@dataclass
class DeepseekCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.FloatTensor | None = None
    """The balance losses included in `loss` (training mode only)."""
    router_outputs: list[RouterOutput] | None = None
    """One RouterOutput per MoE layer (top-k experts, gates, probabilities)."""


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Our init (N(0, initializer_range), norms 1) for what the checkpoint did not provide; fixed tables rebuilt.

        transformers calls this only on modules not fully loaded, and `init.*` skip tensors already loaded."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RoutedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (RotaryEmbedding, HashRouter)):
            module.reset()  # non-persistent tables: never in a checkpoint, always rebuilt


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = False  # the loss is a per-batch mean (balance losses included): Trainer scales it

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__(config)
        self.model = Transformer(config.to_model_config())
        self.model.lm_head = nn.Identity()  # the head lives at the top, under its HF name
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> DeepseekCausalLMOutput:
        """input_ids (B, S) continuing `cache` (if any) -> logits (B, S, V); loss when `labels` are given."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("DeepseekForCausalLM takes input_ids (inputs_embeds is not supported)")
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        start = cache.get_seq_length() if cache is not None else 0
        layer_caches = [_LayerCache(cache, i) for i in range(len(self.model.layers))] if cache is not None else None
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        out = self.model(input_ids, start_pos=start, kv_caches=layer_caches, attention_mask=key_mask)
        hidden = out.logits if not logits_to_keep else out.logits[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = aux = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if self.training:
                aux = balance_loss(out.router_outputs, self.config, loss)
                loss = loss + aux
        return DeepseekCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                      aux_loss=aux, router_outputs=out.router_outputs)


def balance_loss(router_outputs: list[RouterOutput], config: DeepseekConfig, like: torch.Tensor) -> torch.Tensor:
    """The configured auxiliary losses summed over MoE layers (hash layers have nothing to balance)."""
    return sum(auxiliary_losses(router_outputs, config, like), like.new_zeros(()))  # type: ignore[arg-type]
