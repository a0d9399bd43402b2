"""The fields of DeepseekConfig, the HF config class an export carries as remote code, written from ModelConfig.

The remote code (deepseekmoe/hf/remote_code/configuration_deepseek.py) runs without this package, so it cannot
import ModelConfig; its field block (between the two marker lines) is written from it instead: every ModelConfig
field with its annotation and, as default, its value in the deepseek-moe-16b preset's `config.json`
(`ModelConfig.to_hf_dict`), then the HF keys ModelConfig has no field for. tests/test_hf_export.py checks the file
holds exactly what `field_block()` writes; after changing ModelConfig, rewrite it with

    python -m deepseekmoe.convert.hf_config
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ..config import HF_FIXED, ModelConfig
from ..configio import field_types
from ..presets import load_preset

REMOTE_CONFIG = Path(__file__).resolve().parent.parent / "hf" / "remote_code" / "configuration_deepseek.py"
BEGIN = "    # fields: written from deepseekmoe.config.ModelConfig by deepseekmoe/convert/hf_config.py"
END = "    # end of fields"
# HF config keys with no ModelConfig field: (annotation, default).
HF_ONLY: dict[str, tuple[str, Any]] = {
    "hidden_act": ("str", HF_FIXED["hidden_act"]),
    "attention_bias": ("bool", HF_FIXED["attention_bias"]),
    "pretraining_tp": ("int", HF_FIXED["pretraining_tp"]),
    "rope_scaling": ("dict | None", HF_FIXED["rope_scaling"]),
    "attention_dropout": ("float", 0.0),
    "use_cache": ("bool", True),
    "pad_token_id": ("int | None", None),
}
# Fields an HF config.json may hold as null (the remote code's habit): None there means "derive it".
NULLABLE = ("num_key_value_heads", "n_shared_experts", "num_experts_per_tok")
# Fields without a 16B default: the class derives them (router: from n_routed_experts).
UNSET = ("router",)


def field_block() -> str:
    """The class-body lines between BEGIN and END (both included)."""
    defaults = load_preset("deepseekmoe-16b").to_hf_dict()
    lines = [BEGIN]
    for name, tp in field_types(ModelConfig).items():
        annotation = _annotation(tp)
        if name in NULLABLE + UNSET and not annotation.endswith(" | None"):
            annotation += " | None"
        lines.append(f"    {name}: {annotation} = {_literal(None if name in UNSET else defaults[name])}")
    lines += [f"    {name}: {annotation} = {_literal(default)}" for name, (annotation, default) in HF_ONLY.items()]
    return "\n".join([*lines, END]) + "\n"


def _annotation(tp: Any) -> str:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_annotation(a) for a in get_args(tp))
    if tp is type(None):
        return "None"
    return "str" if get_origin(tp) is Literal else tp.__name__


def _literal(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def written_block(text: str) -> str:
    """The field block as the remote-code file holds it."""
    start, end = text.index(BEGIN), text.index(END) + len(END) + 1
    return text[start:end]


def main() -> None:
    text = REMOTE_CONFIG.read_text()
    REMOTE_CONFIG.write_text(text.replace(written_block(text), field_block()))


if __name__ == "__main__":
    main()
