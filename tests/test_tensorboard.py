"""Routing health in metrics.jsonl and TensorBoard: hand-computed statistics, interval sums, and the event file read
back with tensorboard's own reader equal to the metrics.jsonl records."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deepseekmoe.cli import main
from deepseekmoe.train.metrics import routing_health
from train_helpers import make_data_dir, read_metrics, tiny_overrides

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_routing_health_by_hand():
    got = routing_health(torch.tensor([[4, 0, 0, 4], [2, 2, 2, 2], [0, 0, 0, 8]]))
    assert got["expert_load"] == [[4, 0, 0, 4], [2, 2, 2, 2], [0, 0, 0, 8]]
    assert got["expert_load_max_over_mean"] == [2.0, 1.0, 4.0]
    assert got["dead_experts"] == [2, 0, 3]
    assert got["expert_load_entropy"] == pytest.approx([math.log(2), math.log(4), 0.0], abs=1e-4)
    assert routing_health(torch.zeros(0, 0, dtype=torch.long))["dead_experts"] == []


def read_events(run_dir: Path):
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                             size_guidance={event_accumulator.SCALARS: 0,
                                                            event_accumulator.HISTOGRAMS: 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_routing_health_equals_metrics_jsonl(tmp_path):
    data = make_data_dir(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tensorboard=True, log_every=2, max_steps=6, save_every=0),
            "--data", str(data), "--out", str(out)]
    assert main(args) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:  # counts over the 2-step interval: 2 steps x 4 x 32 tokens x K=2
        assert [sum(layer) for layer in r["expert_load"]] == [2 * 4 * 32 * 2] * 2
    acc = read_events(out)
    tags = set(acc.Tags()["scalars"])
    for layer in range(2):
        for key, name in (("expert_load_max_over_mean", "load_max_over_mean"), ("dead_experts", "dead_experts"),
                          ("expert_load_entropy", "load_entropy")):
            tag = f"routing/moe{layer}/{name}"
            assert tag in tags, sorted(tags)
            events = acc.Scalars(tag)
            assert [e.step for e in events] == [2, 4, 6]
            assert [e.value for e in events] == pytest.approx([r[key][layer] for r in records], rel=1e-6)
        hist = acc.Histograms(f"routing/moe{layer}/expert_load")
        assert [h.step for h in hist] == [2, 4, 6]
        for h, r in zip(hist, records):
            assert list(h.histogram_value.bucket) == [float(n) for n in r["expert_load"][layer]]
            assert list(h.histogram_value.bucket_limit) == [float(e + 1) for e in range(8)]
    assert [e.value for e in acc.Scalars("train/lm_loss")] == pytest.approx([r["lm_loss"] for r in records],
                                                                            rel=1e-6)
