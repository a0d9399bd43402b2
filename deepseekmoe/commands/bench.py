"""`deepseekmoe bench NAME`: run one of the side-by-side benchmarks in benchmarks/ (a source checkout)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from ..errors import UserValueError

# name -> the benchmark's module; each has `run(**options, as_json=...)` taking the BenchOptions it applies to
BENCHMARKS = {"moe-layer": "benchmarks.moe_layer", "train-step": "benchmarks.train_step",
              "decode": "benchmarks.decode"}


@dataclass(kw_only=True, frozen=True)
class BenchOptions:
    """The options of `deepseekmoe bench` (bench_command's docstring says what each one is); None, and memory
    left on, mean "the benchmark's default"."""

    shapes: str | None = None
    impls: str | None = None
    presets: str | None = None
    repeats: int | None = None
    batch: int | None = None
    seq: int | None = None
    new_tokens: int | None = None
    budget_s: float | None = None
    dtype: str | None = None
    device: str | None = None
    memory: bool = True
    cache: str | None = None
    json: bool = False

    def __post_init__(self) -> None:
        for name in ("repeats", "batch", "seq", "new_tokens", "budget_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:  # also catches NaN
                raise UserValueError(f"--{name.replace('_', '-')} must be positive, got {value}")

    def given(self) -> dict[str, Any]:
        """The options set away from their defaults, as the benchmark's `run` takes them (json apart)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "json"}
        return {k: v for k, v in values.items() if v is not None and not (k == "memory" and v)}


def load_benchmark(name: str) -> ModuleType:
    """The benchmark's module, imported from the `benchmarks` package of a source checkout."""
    if name not in BENCHMARKS:
        raise UserValueError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    try:
        return importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", BENCHMARKS[name]):
            raise
        raise FileNotFoundError("the benchmarks package is not importable: benchmarks run from a source checkout "
                                "of deepseekmoe (pip install -e .)") from None


def bench_command(benchmark: str, *, options: BenchOptions = BenchOptions()) -> int:
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
    module = load_benchmark(benchmark)
    given = options.given()
    accepted = inspect.signature(module.run).parameters
    extra = [k for k in given if k not in accepted]
    if extra:
        raise UserValueError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in extra)} do not apply to "
                         f"benchmark {benchmark}")
    return int(module.run(**given, as_json=options.json))
