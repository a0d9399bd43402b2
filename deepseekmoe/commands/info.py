"""`deepseekmoe info`: parameter counts, FLOPs and expert combinations of a model, from its config alone."""

from __future__ import annotations

import json as jsonlib
from dataclasses import asdict

from ..accounting import count
from ..config import ModelConfig
from ..errors import UserError
from ..presets import load_preset


def model_config(preset: str | None, config: str | None) -> ModelConfig:
    """The model of `--preset NAME` or `--config FILE` (exactly one of them)."""
    if (preset is None) == (config is None):
        raise UserError("give exactly one of --preset NAME or --config FILE")
    return load_preset(preset) if preset else ModelConfig.load(config)  # type: ignore[arg-type]


def print_rows(rows: list[tuple[str, str]]) -> None:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def info_command(*, preset: str | None = None, config: str | None = None, seq_len: int | None = None,
                 json: bool = False) -> int:
    """Print parameter counts, FLOPs and expert combinations of a model, instantly (no weights allocated).

    Args:
        preset: a preset name (see the error message of an unknown name for the list).
        config: a YAML/JSON ModelConfig file or an HF config.json.
        seq_len: sequence length for the attention FLOPs (default: max_position_embeddings).
        json: print one JSON object instead of a table.
    """
    cfg = model_config(preset, config)
    acc = count(cfg, seq_len)
    if json:
        print(jsonlib.dumps({"name": preset or config, **asdict(acc)}))
        return 0
    rows = [
        ("model", preset or config),
        ("total params", f"{acc.total_params:,} ({_fmt(acc.total_params)})"),
        ("activated params / token", f"{acc.active_params:,} ({_fmt(acc.active_params)})"),
        ("training FLOPs / token", f"{acc.flops_per_token:,} ({_fmt(acc.flops_per_token)})"),
        (f"training FLOPs / {acc.seq_len} tokens", _fmt(acc.flops_per_sequence)),
        ("MoE layers", f"{acc.moe_layers} of {cfg.num_hidden_layers}"),
        ("expert combinations C(N', K')", f"{acc.expert_combinations:,}"),
    ]
    print_rows(rows)
    return 0
