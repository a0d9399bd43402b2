"""The files of an HF export beside its weights: config.json, the remote code it names, tokenizer and generation
defaults, as the released deepseek-moe-16b directories have them.

  config.json              the official fields (ModelConfig.to_hf_dict), the auto_map naming the remote code, the
                           stored dtype, pad_token_id; the same file `save_pretrained` of the model writes.
  configuration_deepseek.py, modeling_deepseek.py
                           this project's standalone model code (deepseekmoe/hf/remote_code), copied verbatim, so
                           `trust_remote_code=True` loads the directory with only transformers installed.
  tokenizer_config.json    (when the checkpoint has a tokenizer.json and none of its own) bos/eos/pad tokens,
                           add_bos_token (AutoTokenizer then prepends bos as this project's CLI, server and
                           harness do; the tokenizer.json gets the post-processor that does it), model_max_length =
                           max_position_embeddings, and the DeepSeek chat template (deepseekmoe.data.chat, the
                           server's). Tokenizer files an imported checkpoint brought are carried unchanged.
  generation_config.json   (when the checkpoint has none) bos/eos/pad ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..data.chat import CHAT_TEMPLATE
from ..data.tokenizer import special_token_ids
from ..filenames import CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from .hf_layout import AUTO_MAP, REMOTE_CODE_DIR, REMOTE_CODE_FILES

# The transformers release the remote code is written against (its API: Cache objects, `cache=` keyword).
TRANSFORMERS_VERSION = "5.24.0"


def hf_config_dict(config: ModelConfig, dtype: torch.dtype, pad_token_id: int | None) -> dict:
    """config.json for the HF directory: the official fields, the remote-code auto_map, the stored dtype (under
    transformers 5's name `dtype`; the released files say `torch_dtype`), pad_token_id."""
    d = config.to_hf_dict()
    del d["torch_dtype"]
    d.update(auto_map=dict(AUTO_MAP), dtype=str(dtype).removeprefix("torch."), pad_token_id=pad_token_id,
             transformers_version=TRANSFORMERS_VERSION)
    return dict(sorted(d.items()))


def pad_token_id(directory: Path) -> int | None:
    """The tokenizer's pad id (its eos when it has no pad token), or None without a tokenizer.json."""
    from tokenizers import Tokenizer

    if not (directory / TOKENIZER_FILE).is_file():
        return None
    try:
        return special_token_ids(Tokenizer.from_file(str(directory / TOKENIZER_FILE)))["pad_token_id"]
    except ValueError:  # no end-of-sequence token, so no fallback pad either
        return None


def write_hf_files(config: ModelConfig, dtype: torch.dtype, out: Path) -> None:
    """Everything but the weights and the copied tokenizer files, into `out` (which holds those already)."""
    pad = pad_token_id(out)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config_dict(config, dtype, pad), indent=2) + "\n")
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, out / name)
    if (out / TOKENIZER_FILE).is_file() and not (out / TOKENIZER_CONFIG_FILE).is_file():
        _write_tokenizer_files(config, pad, out)
    if not (out / GENERATION_CONFIG_FILE).is_file():
        ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": pad}
        (out / GENERATION_CONFIG_FILE).write_text(json.dumps(ids, indent=2) + "\n")


def _write_tokenizer_files(config: ModelConfig, pad: int | None, out: Path) -> None:
    """tokenizer_config.json, and a tokenizer.json post-processor that prepends bos: transformers 5 takes
    add_bos_token from the post-processor alone when there is a tokenizer.json (this project encodes with
    add_special_tokens=False everywhere, so it ignores the post-processor)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    d: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, token_id in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id),
                           ("pad_token", pad)):
        if token_id is not None and tok.id_to_token(token_id) is not None:
            d[name] = tok.id_to_token(token_id)
    if "bos_token" in d:
        bos = d["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, config.bos_token_id)])
        tok.save(str(out / TOKENIZER_FILE))
    d.update(add_bos_token="bos_token" in d, add_eos_token=False, clean_up_tokenization_spaces=False,
             model_max_length=config.max_position_embeddings, chat_template=CHAT_TEMPLATE)
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
