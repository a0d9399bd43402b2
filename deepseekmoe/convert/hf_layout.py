"""The Hugging Face DeepSeekMoE layout, shared by import (hf.py) and export (hf_export.py).

An HF directory (as deepseek-moe-16b-base/chat ship it, SPEC.md section 7):

    config.json                        model_type "deepseek", architectures DeepseekForCausalLM, auto_map
    configuration_deepseek.py, modeling_deepseek.py   the remote code auto_map names
    model-0000k-of-0000n.safetensors   one tensor per HF key, nn.Linear weights as [out, in]
    model.safetensors.index.json       {"metadata": {"total_size": bytes}, "weight_map": {key: file}}
                                       (a single-file checkpoint is model.safetensors without an index)
    tokenizer.json, tokenizer_config.json, ...

Our checkpoint (checkpoint.py) holds the same tensors with two differences: keys drop the `model.` prefix,
and the routed experts of a layer are stacked, `experts.gate_up_proj` [E, 2F, D] (rows [0, F) gate_proj, rows
[F, 2F) up_proj) and `experts.down_proj` [E, D, F], where HF keeps one [F, D] / [D, F] tensor per expert.
`hf_layout` gives every HF key and shape for a config, `our_source` where each HF tensor lives in ours.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint import open_safetensors
from ..config import ModelConfig
from ..errors import UserValueError
from ..filenames import CONFIG_FILE, GENERATION_CONFIG_FILE, MODEL_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

INDEX_FILE = "model.safetensors.index.json"
# Files carried across unchanged in both directions (tokenizer and generation defaults).
SIDE_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json", GENERATION_CONFIG_FILE)
# An export's remote code: this project's standalone model files (deepseekmoe/hf/remote_code), copied verbatim,
# and the auto_map naming them (the released one, plus the sequence-classification head).
REMOTE_CODE_DIR = Path(__file__).resolve().parent.parent / "hf" / "remote_code"
REMOTE_CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    "AutoModelForSequenceClassification": "modeling_deepseek.DeepseekForSequenceClassification",
}

# HF key -> our key, one tensor each; `{}` stands for a layer index.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "model.layers.{}.mlp.gate.weight": "layers.{}.mlp.gate.weight",
    "model.layers.{}.mlp.shared_experts.gate_proj.weight": "layers.{}.mlp.shared_experts.gate_proj.weight",
    "model.layers.{}.mlp.shared_experts.up_proj.weight": "layers.{}.mlp.shared_experts.up_proj.weight",
    "model.layers.{}.mlp.shared_experts.down_proj.weight": "layers.{}.mlp.shared_experts.down_proj.weight",
}
# HF per-expert key (layer, expert) -> (our stacked key (layer), which block of rows: 0 gate, 1 up, None all).
EXPERT_MAP = {
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": ("layers.{}.mlp.experts.gate_up_proj", 0),
    "model.layers.{}.mlp.experts.{}.up_proj.weight": ("layers.{}.mlp.experts.gate_up_proj", 1),
    "model.layers.{}.mlp.experts.{}.down_proj.weight": ("layers.{}.mlp.experts.down_proj", None),
}

Shape = tuple[int, ...]


def _template(key: str) -> tuple[str, list[int]]:
    """'model.layers.3.mlp.experts.17.up_proj.weight' -> ('model.layers.{}.mlp.experts.{}.up_proj.weight', [3, 17])."""
    numbers = [int(n) for n in re.findall(r"(?<=\.)\d+(?=\.)", key)]
    return re.sub(r"(?<=\.)\d+(?=\.)", "{}", key), numbers


def our_source(hf_key: str) -> tuple[str, tuple]:
    """HF key -> (our key, index into our tensor) for reading one HF tensor out of our checkpoint."""
    pattern, numbers = _template(hf_key)
    if pattern in WEIGHT_MAP:
        return WEIGHT_MAP[pattern].format(*numbers), ()
    our_pattern, part = EXPERT_MAP[pattern]
    layer, expert = numbers
    return our_pattern.format(layer), (expert, part)


def format_shape(shape: Shape | list[int]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def hf_layout(config: ModelConfig) -> dict[str, Shape]:
    """Every HF key and its shape, in the module order of the original remote code (and of its save_pretrained)."""
    d, h, hkv, hd = config.hidden_size, config.num_attention_heads, config.num_kv_heads, config.head_dim
    layout: dict[str, Shape] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layout[p + "self_attn.q_proj.weight"] = (h * hd, d)
        layout[p + "self_attn.k_proj.weight"] = (hkv * hd, d)
        layout[p + "self_attn.v_proj.weight"] = (hkv * hd, d)
        layout[p + "self_attn.o_proj.weight"] = (d, h * hd)
        layout.update(_moe_layout(config, p) if config.is_moe_layer(i)
                      else _ffn_layout(p + "mlp.", d, config.intermediate_size))
        layout[p + "input_layernorm.weight"] = (d,)
        layout[p + "post_attention_layernorm.weight"] = (d,)
    layout["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = (config.vocab_size, d)
    return layout


def _ffn_layout(prefix: str, d: int, f: int) -> dict[str, Shape]:
    return {prefix + "gate_proj.weight": (f, d), prefix + "up_proj.weight": (f, d), prefix + "down_proj.weight": (d, f)}


def _moe_layout(config: ModelConfig, p: str) -> dict[str, Shape]:
    d, f = config.hidden_size, config.moe_intermediate_size
    layout: dict[str, Shape] = {}
    for e in range(config.n_routed_experts or 0):
        layout.update(_ffn_layout(f"{p}mlp.experts.{e}.", d, f))
    if config.router != "hash":  # the hash router has no learned parameters
        layout[p + "mlp.gate.weight"] = (config.n_routed_experts, d)
    if config.n_shared_experts:
        layout.update(_ffn_layout(p + "mlp.shared_experts.", d, f * config.n_shared_experts))
    return layout



def our_entries(config: ModelConfig, dtypes: dict[str, torch.dtype]) -> dict[str, tuple[torch.dtype, Shape]]:
    """Our tensors (name -> dtype, shape) assembled from the HF ones; a layer's experts must share one dtype."""
    entries: dict[str, tuple[torch.dtype, Shape]] = {}
    for hf_key, shape in hf_layout(config).items():
        our_key, index = our_source(hf_key)
        dtype = dtypes[hf_key]
        if index:
            rows = shape[0] * (1 if index[1] is None else 2)
            if our_key in entries and entries[our_key][0] != dtype:
                raise UserValueError(f"tensor {hf_key} has dtype {dtype}, but the other experts of its layer are "
                                 f"{entries[our_key][0]}")
            shape = (config.n_routed_experts, rows, shape[1])
        entries[our_key] = (dtype, shape)
    return entries


def is_hf_directory(path: str | Path) -> bool:
    """A directory whose config.json says model_type 'deepseek' and that holds HF-keyed safetensors."""
    p = Path(path)
    try:
        if json.loads((p / CONFIG_FILE).read_text()).get("model_type") != "deepseek":
            return False
    except (OSError, ValueError, AttributeError):
        return False
    if (p / INDEX_FILE).is_file():
        return True
    if not (p / MODEL_FILE).is_file():
        return False
    with open_safetensors(str(p / MODEL_FILE)) as f:
        return any(k.startswith("model.") for k in f.keys())

def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the SIDE_FILES `src` has into `dst`."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
