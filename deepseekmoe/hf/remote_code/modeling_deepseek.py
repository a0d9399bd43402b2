"""DeepSeekMoE (DeepSeek v1) for transformers: fine-grained routed experts + always-on shared experts.

Parameter names are the released checkpoints' (`model.layers.N.self_attn.q_proj.weight`,
`model.layers.N.mlp.gate.weight` [E, D], `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`,
`model.layers.N.mlp.shared_experts.*` of width n_shared_experts * moe_intermediate_size, `lm_head.weight`), so
deepseek-moe-16b loads as is. A MoE layer: softmax over the routed experts in fp32, the top-k probabilities as
gates (renormalised only with norm_topk_prob), the chosen experts' SwiGLU outputs weighted by them, plus the shared
experts on every token. Attention is causal multi-head attention (GQA through num_key_value_heads) with rotary
embeddings (rotate-half, computed in fp32), on transformers' attention functions (sdpa by default; eager when
attention weights are asked for) and `Cache` classes (dynamic or static).

Outputs follow the released remote code: `hidden_states` holds the input of every layer and then the final normed
state (num_hidden_layers + 1 tensors), `attentions` the softmax weights of every layer, and in training mode
`aux_loss` is the configured balance losses (expert-level, device-level, z-loss), added to `loss` when labels are
given. `router_logits` holds each MoE layer's fp32 router logits (T, E) when asked for (`output_router_logits`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (MoeCausalLMOutputWithPast, MoeModelOutputWithPast,
                                           SequenceClassifierOutputWithPast)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_deepseek import DeepseekConfig

# The files an export needs beside its weights: this one and the config it imports.
CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")


class DeepseekRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class DeepseekRotaryEmbedding(nn.Module):
    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, S) -> cos, sin (B, 1, S, head_dim), float32."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class DeepseekMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); dense layers, each routed expert and the merged shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepseekGate(nn.Module):
    """Softmax top-k router; with capacity_factor, assignments past an expert's capacity ceil(cf * T * K / E)
    (first choices of all tokens first, then second choices, each in token order) keep their index with gate 0."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, x_TD: torch.Tensor, input_ids: torch.Tensor | None):
        """-> (topk_idx (T, K), gates (T, K) fp32, logits (T, E) fp32)."""
        logits = x_TD.float() @ self.weight.float().t()
        weight, idx = torch.topk(logits.softmax(dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        if self.capacity_factor is not None:
            t, k = idx.shape
            capacity = math.ceil(self.capacity_factor * t * k / self.weight.shape[0])
            one_hot = F.one_hot(idx.t().reshape(-1), self.weight.shape[0])
            rank = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
            weight = weight * (rank < capacity).view(k, t).t()
        return idx, weight, logits


class DeepseekHashGate(nn.Module):
    """Hash-layer router: a fixed token-id -> expert table (a seeded permutation of the vocabulary dealt round-robin
    to the experts, seed hash_seed + layer), gate 1; no parameters."""

    def __init__(self, config: DeepseekConfig, layer_idx: int) -> None:
        super().__init__()
        self.vocab_size, self.num_experts = config.vocab_size, config.n_routed_experts
        self.seed = config.hash_seed + layer_idx
        self.register_buffer("table", self.compute_table(), persistent=False)

    def compute_table(self) -> torch.Tensor:
        perm = torch.randperm(self.vocab_size, generator=torch.Generator().manual_seed(self.seed))
        table = torch.empty(self.vocab_size, dtype=torch.long)
        table[perm] = torch.arange(self.vocab_size) % self.num_experts
        return table

    def forward(self, x_TD: torch.Tensor, input_ids: torch.Tensor | None):
        if input_ids is None:
            raise ValueError("a hash-routed model needs input_ids (it routes by token id), not inputs_embeds")
        idx = self.table[input_ids.reshape(-1)].unsqueeze(1)
        return idx, torch.ones(idx.shape, dtype=torch.float32, device=x_TD.device), None


class DeepseekMoE(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int) -> None:
        super().__init__()
        self.gate = DeepseekHashGate(config, layer_idx) if config.router == "hash" else DeepseekGate(config)
        self.experts = nn.ModuleList(DeepseekMLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.n_routed_experts))
        n_shared = config.n_shared_experts or 0
        self.shared_experts = (DeepseekMLP(config.hidden_size, config.moe_intermediate_size * n_shared)
                               if n_shared else None)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None):
        """x (B, S, D) -> (y (B, S, D), router logits (T, E) fp32, None for the hash router)."""
        b, s, d = x.shape
        x_TD = x.reshape(b * s, d)
        idx_TK, weight_TK, logits = self.gate(x_TD, input_ids)
        flat = idx_TK.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // idx_TK.shape[1]
        rows = x_TD[token].split(torch.bincount(flat, minlength=len(self.experts)).tolist())
        y_R = torch.cat([expert(r) for expert, r in zip(self.experts, rows)])
        y_R = y_R * weight_TK.reshape(-1)[order, None].to(y_R.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token, y_R.to(x_TD.dtype))
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(b, s, d), logits


def eager_attention(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v with the weights returned; mask: additive, boolean (True attends) or None
    (plain causal, queries at the end of the keys)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(2, 3)) * scaling
    if mask is None:
        s_q, s_k = q.shape[2], k.shape[2]
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask[..., :k.shape[2]]
    weights = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), p=dropout, training=module.training)
    return (weights @ v).transpose(1, 2).contiguous(), weights


class DeepseekAttention(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int) -> None:
        super().__init__()
        d, h, hkv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.config, self.layer_idx, self.head_dim = config, layer_idx, hd
        self.num_key_value_groups, self.scaling, self.is_causal = h // hkv, hd ** -0.5, True
        self.q_proj = nn.Linear(d, h * hd, bias=False)
        self.k_proj = nn.Linear(d, hkv * hd, bias=False)
        self.v_proj = nn.Linear(d, hkv * hd, bias=False)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: Cache | None, output_attentions: bool = False, **kwargs):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = eager_attention if output_attentions else ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention)
        dropout = self.config.attention_dropout if self.training else 0.0
        out, weights = attend(self, q, k, v, mask, scaling=self.scaling, dropout=dropout, **kwargs)
        return self.o_proj(out.reshape(b, s, -1)), weights


class DeepseekDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DeepseekAttention(config, layer_idx)
        self.post_attention_layernorm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = DeepseekMoE(config, layer_idx) if self.is_moe else DeepseekMLP(config.hidden_size,
                                                                                   config.intermediate_size)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                input_ids: torch.Tensor | None = None, cache: Cache | None = None, output_attentions: bool = False,
                **kwargs):
        """-> (x, attention weights or None, router logits (T, E) or None)."""
        h, weights = self.self_attn(self.input_layernorm(x), rotary, mask, cache, output_attentions, **kwargs)
        x = x + h
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, logits = self.mlp(h, input_ids)
            return x + h, weights, logits
        return x + self.mlp(h), weights, None


def balance_loss(router_logits: tuple[torch.Tensor, ...], config: DeepseekConfig, batch_size: int) -> torch.Tensor:
    """The configured balance losses summed over the learned-router MoE layers, from their router logits (T, E)
    (the choices are the top-k of their softmax, as the router made them; counted before any capacity drop).

    Expert level (alpha1): sum_i f_i P_i with f_i = E / (K T) * #(tokens choosing i), P_i = mean_t s_{i,t}, over
    each sequence (seq_aux) or the whole batch; device level (alpha2): the same over n_device_groups contiguous
    groups of experts (f' the mean of f, P' the sum of P over a group); z-loss: mean_t logsumexp(logits_t)^2."""
    total = torch.zeros((), device=router_logits[0].device) if router_logits else torch.zeros(())
    groups, k = (batch_size if config.seq_aux else 1), config.num_experts_per_tok
    for logits in router_logits:
        e = logits.shape[1]
        probs_TE = logits.softmax(dim=-1)
        idx_TK = probs_TE.topk(k, dim=-1).indices
        probs_GTE = probs_TE.view(groups, -1, e)
        t = probs_GTE.shape[1]
        counts_GE = torch.zeros(groups, e, device=logits.device).scatter_add_(
            1, idx_TK.reshape(groups, t * k), torch.ones(groups, t * k, device=logits.device))
        f_GE, p_GE = counts_GE * (e / (k * t)), probs_GTE.mean(dim=1)
        total = total + config.aux_loss_alpha * (f_GE * p_GE).sum(-1).mean()
        if config.device_aux_loss_alpha > 0:
            f_dev = f_GE.view(groups, config.n_device_groups, -1).mean(-1)
            p_dev = p_GE.view(groups, config.n_device_groups, -1).sum(-1)
            total = total + config.device_aux_loss_alpha * (f_dev * p_dev).sum(-1).mean()
        if config.z_loss_alpha > 0:
            total = total + config.z_loss_alpha * torch.logsumexp(logits, dim=-1).pow(2).mean()
    return total


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    config: DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range) weights and unit norms for what a checkpoint did not provide; the fixed tables
        (rotary frequencies, hash routes) are always rebuilt, never stored."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeepseekGate):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeepseekRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DeepseekRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, DeepseekHashGate):
            init.copy_(module.table, module.compute_table())

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs) -> None:
        """transformers' save_pretrained, plus the code files config.json's auto_map names."""
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            for name in CODE_FILES:
                target = Path(save_directory) / name
                if Path(__file__).resolve().with_name(name) != target.resolve():
                    shutil.copyfile(Path(__file__).with_name(name), target)


class DeepseekModel(DeepseekPreTrainedModel):
    """The decoder stack without the LM head: embeddings, layers, final norm."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeepseekRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, **kwargs) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        cfg = self.config
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        kwargs.pop("return_dict", None)
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        want_attentions = bool(cfg.output_attentions if output_attentions is None else output_attentions)
        want_hidden = bool(cfg.output_hidden_states if output_hidden_states is None else output_hidden_states)
        cache = None if not use_cache else DynamicCache(config=cfg) if cache is None else cache
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(start, start + x.shape[1], device=x.device)[None]
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        rotary = self.rotary_emb(position_ids)
        hidden, attentions, router_logits = [], [], []
        for layer in self.layers:
            hidden.append(x)
            x, weights, logits = layer(x, rotary=rotary, mask=mask, input_ids=input_ids, cache=cache,
                                       output_attentions=want_attentions, **kwargs)
            attentions.append(weights)
            router_logits += [] if logits is None else [logits]
        x = self.norm(x)
        return MoeModelOutputWithPast(last_hidden_state=x, cache=cache,
                                      hidden_states=(*hidden, x) if want_hidden else None,
                                      attentions=tuple(attentions) if want_attentions else None,
                                      router_logits=tuple(router_logits) if output_router_logits else None)


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = False  # the loss is a per-batch mean (balance losses included): Trainer scales it

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_router_logits: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        """Logits (B, S, V) (the last `logits_to_keep` positions when given); the shifted cross-entropy when
        `labels` are given, plus `aux_loss` (the balance losses) in training mode."""
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_router_logits=bool(output_router_logits) or self.training, **kwargs)
        hidden = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = aux = None
        if self.training and out.router_logits:
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            aux = balance_loss(out.router_logits, self.config, batch)
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      **loss_kwargs)
            loss = loss if aux is None else loss + aux
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, cache=out.cache,
                                         hidden_states=out.hidden_states, attentions=out.attentions,
                                         router_logits=out.router_logits if output_router_logits else None)


class DeepseekForSequenceClassification(DeepseekPreTrainedModel):
    """A linear score head on the last token that is not padding (pad_token_id), as transformers' other decoders."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DeepseekModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                **kwargs) -> SequenceClassifierOutputWithPast:
        out = self.model(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.score(out.last_hidden_state)
        batch = logits.shape[0]
        if self.config.pad_token_id is None or input_ids is None:
            if batch != 1 and self.config.pad_token_id is None:
                raise ValueError("a batch of more than one sequence needs pad_token_id in the config")
            last = torch.full((batch,), logits.shape[1] - 1, device=logits.device)
        else:
            real = (input_ids != self.config.pad_token_id).int()
            last = (torch.arange(input_ids.shape[1], device=input_ids.device) * real).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last.to(logits.device)]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled, cache=out.cache,
                                                hidden_states=out.hidden_states, attentions=out.attentions)


__all__ = ["DeepseekConfig", "DeepseekPreTrainedModel", "DeepseekModel", "DeepseekForCausalLM",
           "DeepseekForSequenceClassification"]
