"""Hugging Face checkpoint import/export: the one place that knows the HF DeepSeekMoE layout.

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

Import first checks every key, shape and dtype from config.json, the index and the shard headers (no tensor
data read), so a bad checkpoint fails before any output exists. Then it streams shard by shard, tensor by tensor
(safetensors `safe_open`): each HF tensor is one contiguous block of one of our tensors (an expert's gate rows,
up rows or down matrix inside the stacked tensor), so it is written straight to its byte range of the output
file (`stream.SafetensorsWriter`) and experts that span shards need no buffering: peak memory is one shard's
pages plus one tensor, whatever the model size. Dtypes are kept (bf16 stays bf16). Loading into memory
(`read_hf_state`, `load_hf_model`) fills preallocated tensors the same way. Export, the way back, lives in
`hf_export.py` and takes every name and shape from here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

import torch

from ..config import ModelConfig
from ..checkpoint import open_safetensors
from .stream import DTYPES, SafetensorsWriter

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files carried across unchanged in both directions (tokenizer and generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
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


def _our_source(hf_key: str) -> tuple[str, tuple]:
    """HF key -> (our key, index into our tensor) for reading one HF tensor out of our checkpoint."""
    pattern, numbers = _template(hf_key)
    if pattern in WEIGHT_MAP:
        return WEIGHT_MAP[pattern].format(*numbers), ()
    our_pattern, part = EXPERT_MAP[pattern]
    layer, expert = numbers
    return our_pattern.format(layer), (expert, part)


def _fmt(shape: Shape | list[int]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


# ------------------------------------------------------------------------------------------------- the layout
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


def read_hf_config(hf_dir: Path) -> ModelConfig:
    path = hf_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no {CONFIG_FILE}")
    try:
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _inside(name: object) -> bool:
    """A relative path that stays inside its directory (no absolute path, no climbing out with '..')."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    parts = Path(os.path.normpath(name)).parts
    return bool(parts) and parts[0] != ".."


def weight_files(hf_dir: Path) -> dict[str, list[str]]:
    """{shard file name: [keys]} from the index (or the single model.safetensors), in file order."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        for name in files:
            if not _inside(name):  # judged on the name alone: hub caches link shards to blobs elsewhere
                raise ValueError(f"{index} names the shard {name!r}, which is not a file inside {hf_dir}")
            if not (hf_dir / name).is_file():
                raise FileNotFoundError(f"{index} names {name}, which does not exist")
        return dict(sorted(files.items()))
    single = hf_dir / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{hf_dir}: neither {INDEX_FILE} nor {SINGLE_FILE}")
    with open_safetensors(str(single)) as f:
        return {SINGLE_FILE: list(f.keys())}


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
    if not (p / SINGLE_FILE).is_file():
        return False
    with open_safetensors(str(p / SINGLE_FILE)) as f:
        return any(k.startswith("model.") for k in f.keys())


# ------------------------------------------------------------------------------------------------------ import
def _check_keys(hf_dir: Path, files: dict[str, list[str]], layout: dict[str, Shape]) -> None:
    """One error line for the first missing or unexpected tensor, with the shapes involved."""
    present = {k: name for name, keys in files.items() for k in keys}
    missing = [k for k in layout if k not in present]
    if missing:
        raise ValueError(f"{hf_dir}: missing tensor {missing[0]} (expected shape {_fmt(layout[missing[0]])} from "
                         f"config.json; {len(missing)} missing in all)")
    unexpected = [k for k in present if k not in layout and not _is_tied_head(k, layout)]
    if unexpected:
        key, name = unexpected[0], present[unexpected[0]]
        with open_safetensors(str(hf_dir / name)) as f:
            shape = f.get_slice(key).get_shape() if key in f.keys() else "?"
        raise ValueError(f"{hf_dir / name}: unexpected tensor {key} with shape {_fmt(shape)} (not in the model "
                         f"config.json describes; {len(unexpected)} unexpected in all)")


def _is_tied_head(key: str, layout: dict[str, Shape]) -> bool:
    """A tied LM head may still be stored; it is the embedding, so it is skipped."""
    return key == "lm_head.weight" and "lm_head.weight" not in layout


def _scan(hf_dir: Path, files: dict[str, list[str]], layout: dict[str, Shape]) -> dict[str, torch.dtype]:
    """Check every stored tensor against the layout from the shard headers alone -> {HF key: dtype}."""
    dtypes: dict[str, torch.dtype] = {}
    for name, keys in files.items():
        with open_safetensors(str(hf_dir / name)) as f:
            stored = set(f.keys())
            for key in keys:
                if _is_tied_head(key, layout):
                    continue
                if key not in stored:
                    raise ValueError(f"{hf_dir / INDEX_FILE} places {key} in {name}, which does not contain it")
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                if shape != layout[key]:
                    raise ValueError(f"{hf_dir / name}: tensor {key} has shape {_fmt(shape)}, expected "
                                     f"{_fmt(layout[key])} from config.json")
                dtypes[key] = DTYPES[piece.get_dtype()]
    return dtypes


def our_entries(config: ModelConfig, dtypes: dict[str, torch.dtype]) -> dict[str, tuple[torch.dtype, Shape]]:
    """Our tensors (name -> dtype, shape) assembled from the HF ones; a layer's experts must share one dtype."""
    entries: dict[str, tuple[torch.dtype, Shape]] = {}
    for hf_key, shape in hf_layout(config).items():
        our_key, index = _our_source(hf_key)
        dtype = dtypes[hf_key]
        if index:
            rows = shape[0] * (1 if index[1] is None else 2)
            if our_key in entries and entries[our_key][0] != dtype:
                raise ValueError(f"tensor {hf_key} has dtype {dtype}, but the other experts of its layer are "
                                 f"{entries[our_key][0]}")
            shape = (config.n_routed_experts, rows, shape[1])
        entries[our_key] = (dtype, shape)
    return entries


def _element_offset(index: tuple, numel: int) -> int:
    """Where one HF tensor of `numel` elements starts inside our (flattened) tensor: experts are stacked, and
    within gate_up_proj each expert's gate rows come before its up rows."""
    if not index:
        return 0
    expert, part = index
    return expert * numel if part is None else (2 * expert + part) * numel


def _stream(hf_dir: Path, files: dict[str, list[str]], layout: dict[str, Shape], device: str | torch.device,
            progress: bool) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(our key, element offset, tensor) for every HF tensor, one shard open at a time."""
    for n, (name, keys) in enumerate(files.items(), 1):
        if progress:
            print(f"reading {name} ({n}/{len(files)}, {len(keys)} tensors)", file=sys.stderr, flush=True)
        with open_safetensors(str(hf_dir / name), str(device)) as f:
            for key in keys:
                if not _is_tied_head(key, layout):
                    t = f.get_tensor(key)
                    our_key, index = _our_source(key)
                    yield our_key, _element_offset(index, t.numel()), t


def _open(hf_dir: Path) -> tuple[ModelConfig, dict[str, list[str]], dict[str, Shape], dict]:
    """Read config.json and the shard headers; every check that needs no tensor data happens here."""
    if not is_hf_directory(hf_dir):
        raise ValueError(f"{hf_dir} is not a Hugging Face DeepSeekMoE directory (config.json with model_type "
                         f"'deepseek' beside HF-keyed safetensors weights)")
    config = read_hf_config(hf_dir)
    layout = hf_layout(config)
    files = weight_files(hf_dir)
    _check_keys(hf_dir, files, layout)
    return config, files, layout, our_entries(config, _scan(hf_dir, files, layout))


def read_hf_state(hf_dir: str | Path, device: str | torch.device = "cpu",
                  progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF directory -> (config, our state dict), checking every key and shape before reading any data."""
    hf_dir = Path(hf_dir)
    config, files, layout, entries = _open(hf_dir)
    state = {k: torch.empty(shape, dtype=dtype, device=device) for k, (dtype, shape) in entries.items()}
    for our_key, start, t in _stream(hf_dir, files, layout, device, progress):
        state[our_key].view(-1)[start:start + t.numel()] = t.reshape(-1)
    return config, state


def load_hf_model(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None):
    """An HF directory -> (Transformer in eval mode, the directory); the checkpoint's dtype unless `dtype`."""
    from ..model import Transformer

    config, state = read_hf_state(path, device)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights()  # rebuilds the non-persistent tables (rotary, hash); weights are assigned below
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)  # keys were checked; tensors are used as read
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if dtype is not None:
        model.to(dtype)
    return model.eval(), Path(path)


def convert_from_hf(hf_dir: str | Path, out: str | Path, progress: bool = False) -> Path:
    """HF directory -> our checkpoint directory (model.safetensors, config.json, tokenizer files), atomically.

    Each HF tensor is written straight to its place in the output file: peak memory is one tensor."""
    from ..checkpoint import MODEL_FILE
    from ..fileio import written_atomically

    hf_dir, out = Path(hf_dir), Path(out)
    config, files, layout, entries = _open(hf_dir)
    with written_atomically(out) as tmp:
        with SafetensorsWriter(tmp / MODEL_FILE, entries) as writer:
            for our_key, start, t in _stream(hf_dir, files, layout, "cpu", progress):
                writer.write(our_key, t, start)
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        _copy_side_files(hf_dir, tmp)
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# --------------------------------------------------------------------------------------------------------- CLI
def convert_command(*, from_hf: str | None = None, to_hf: str | None = None, from_checkpoint: str | None = None,
                    out: str, quantize: str | None = None, group_size: int = 128, max_shard_size: str = "5GB",
                    overwrite: bool = False) -> int:
    """Convert between the Hugging Face DeepSeekMoE layout and this project's checkpoint directory.

    `--from-hf HF_DIR --out CHECKPOINT` imports a DeepseekForCausalLM directory (config.json, sharded safetensors
    with model.safetensors.index.json, tokenizer files), streaming shard by shard and keeping the dtype.
    `--to-hf CHECKPOINT --out HF_DIR` exports a checkpoint (or a run's latest) to that layout, sharded, with an
    index, a config.json whose auto_map names the model code written beside it (standalone: transformers loads the
    directory with trust_remote_code=True, without this package), tokenizer files with the chat template, and
    generation_config.json.
    `--quantize int8|int4` (with --from-hf, or --from-checkpoint CHECKPOINT) writes a weight-only quantized
    checkpoint instead, quantizing tensor by tensor as it streams (int8: a scale per output channel; int4: a scale
    per --group-size input columns); generate, eval and serve run it.

    Args:
        from_hf: an HF directory to import.
        to_hf: a checkpoint or run directory to export.
        from_checkpoint: a float checkpoint or run directory to quantize (with --quantize).
        quantize: int8 or int4: write a weight-only quantized checkpoint.
        group_size: input columns per int4 scale: 32, 64, 128 (default) or 256.
        out: the directory to write (written aside and renamed into place when complete).
        max_shard_size: largest safetensors shard when exporting, e.g. 5GB, 500MB, 2GiB.
        overwrite: replace --out if it already exists.
    """
    if sum(p is not None for p in (from_hf, to_hf, from_checkpoint)) != 1:
        raise ValueError("give exactly one of --from-hf HF_DIR, --to-hf CHECKPOINT or --from-checkpoint CHECKPOINT")
    if (from_checkpoint is not None or to_hf is not None) and (quantize is None) == (to_hf is None):
        raise ValueError("--from-checkpoint needs --quantize int8|int4; --to-hf exports float weights only")
    src, dst = Path(from_hf or to_hf or from_checkpoint), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"no such directory: {src}")
    if dst.resolve() == src.resolve():
        raise ValueError(f"--out {dst} is the source directory; choose another path")
    if dst.resolve() in src.resolve().parents:
        raise ValueError(f"--out {dst} contains the source {src}; replacing it would delete the source: "
                         "choose another path")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"--out {dst} already exists and is not empty (pass --overwrite to replace it)")
    if quantize is not None:
        from .quantize import check_format, convert_quantized

        convert_quantized(src, dst, check_format(quantize, group_size), group_size, progress=True)
    elif from_hf is not None:
        convert_from_hf(src, dst, progress=True)
    else:
        from .hf_export import convert_to_hf, parse_size

        convert_to_hf(src, dst, parse_size(max_shard_size), progress=True)
    print(f"wrote {dst}", file=sys.stderr)
    return 0
