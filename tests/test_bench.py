"""`deepseekmoe bench`: dispatch to benchmarks/, option checking, and a tiny moe-layer run end to end."""

from __future__ import annotations

import json

import pytest

from deepseekmoe.cli import main


def test_unknown_benchmark_and_foreign_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'; available: moe-layer, train-step, decode" in capsys.readouterr().err
    assert main(["bench", "decode", "--shapes", "s1"]) == 2
    assert "--shapes do not apply to benchmark decode" in capsys.readouterr().err
    assert main(["bench", "moe-layer", "--shapes", "huge"]) == 2
    assert "unknown shape(s) huge" in capsys.readouterr().err
    assert main(["bench", "moe-layer", "--cache", "hot"]) == 2
    assert "cache='hot': expected cold or warm" in capsys.readouterr().err
    assert main(["bench", "train-step", "--cache", "warm"]) == 2
    assert "--cache do not apply to benchmark train-step" in capsys.readouterr().err


def test_moe_layer_decode_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "moe-layer", "--shapes", "decode-1", "--impls", "dense,ours:auto,ours:loop,hf:eager",
                 "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["impl"]: r for r in out["results"]}
    assert set(rows) == {"dense", "ours:auto", "ours:loop", "hf:eager"}
    assert out["machine"]["torch"]
    assert rows["ours:loop"]["max_rel_diff"] < 1e-5 and rows["hf:eager"]["max_rel_diff"] < 1e-5  # same function
    assert rows["dense"]["x_dense"] == 1.0 and rows["ours:auto"]["runs"] == 10


def test_cache_flusher_streams_twice_the_last_level_cache() -> None:
    """cache="cold" streams a buffer of twice the last-level cache (read from sysfs where it exists) before every
    timed call; "warm" does nothing."""
    from deepseekmoe.commands.bench import load_benchmark

    moe_layer = load_benchmark("moe-layer")
    flush = moe_layer.cache_flusher("cold", "cpu")
    flush()
    buffer = flush.__closure__[0].cell_contents  # type: ignore[union-attr]
    assert buffer.numel() * 4 == 2 * moe_layer._last_level_cache_bytes() and float(buffer[0]) == 1.0
    assert moe_layer._last_level_cache_bytes() >= 1 << 20
    assert moe_layer.cache_flusher("warm", "cpu")() is None


def test_benchmarks_are_imported_as_modules_of_the_benchmarks_package() -> None:
    import importlib
    import sys

    from deepseekmoe.commands.bench import BENCHMARKS, BenchOptions, bench_command, load_benchmark

    for name, module in BENCHMARKS.items():
        assert load_benchmark(name) is importlib.import_module(module) is sys.modules[module]
    assert BenchOptions(repeats=2, memory=False, json=True).given() == {"repeats": 2, "memory": False}
    with pytest.raises(ValueError, match="--budget-s must be positive, got nan"):
        BenchOptions(budget_s=float("nan"))
    with pytest.raises(ValueError, match="--seq do not apply to benchmark decode"):
        bench_command("decode", options=BenchOptions(seq=8))
