"""`deepseekmoe bench NAME`: run one of the side-by-side benchmarks in benchmarks/ (a source checkout)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = {"moe-layer": "moe_layer.py", "train-step": "train_step.py", "decode": "decode.py"}


def _load(name: str) -> ModuleType:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    path = Path(__file__).resolve().parents[2] / "benchmarks" / BENCHMARKS[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: benchmarks run from a source checkout of deepseekmoe")
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[path.stem] = module  # dataclasses and the sibling benchmarks look it up by name
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def bench_command(benchmark: str, *, shapes: str | None = None, impls: str | None = None,
                  presets: str | None = None, repeats: int | None = None, batch: int | None = None,
                  seq: int | None = None, new_tokens: int | None = None, budget_s: float | None = None,
                  dtype: str | None = None, device: str | None = None, memory: bool = True,
                  cache: str | None = None, json: bool = False) -> int:
    """Run a benchmark: moe-layer (MoE block vs dense FFN vs transformers), train-step (tokens/s, MFU) or decode.

    Results print as a table, or as one JSON object with --json; benchmarks/README.md explains the method and
    holds recorded results. Options not listed for a benchmark are rejected.

    Args:
        benchmark: moe-layer, train-step or decode.
        shapes: moe-layer: comma-separated shape names (s1, decode-1, 16b-2k, ...).
        impls: moe-layer: contenders (dense, ours:auto, ours:per_expert, hf:grouped_mm, ...); train-step/decode:
            experts_impl values (grouped,loop).
        presets: train-step/decode: comma-separated preset names.
        repeats: timed repeats per contender.
        batch: train-step/decode: batch size.
        seq: train-step: sequence length.
        new_tokens: decode: tokens generated per run.
        budget_s: moe-layer: rough timed seconds per contender and shape.
        dtype: moe-layer: float32 or bfloat16.
        device: moe-layer: cpu or cuda.
        memory: moe-layer: measure peak memory (--no-memory skips it).
        cache: moe-layer: cold (default: caches flushed before every timed call, as between a model's layers)
            or warm.
        json: print one JSON object instead of a table.
    """
    for name, value in {"repeats": repeats, "batch": batch, "seq": seq, "new_tokens": new_tokens,
                        "budget_s": budget_s}.items():
        if value is not None and not value > 0:  # also catches NaN
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    module = _load(benchmark)
    given = {"shapes": shapes, "impls": impls, "presets": presets, "repeats": repeats, "batch": batch, "seq": seq,
             "new_tokens": new_tokens, "budget_s": budget_s, "dtype": dtype, "device": device, "cache": cache}
    given = {k: v for k, v in given.items() if v is not None}
    if not memory:
        given["memory"] = False
    accepted = inspect.signature(module.run).parameters
    extra = [k for k in given if k not in accepted]
    if extra:
        raise ValueError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in extra)} do not apply to "
                         f"benchmark {benchmark}")
    return int(module.run(**given, as_json=json))
