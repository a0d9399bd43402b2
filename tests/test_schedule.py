"""LR schedules (values at warmup end, 80% and 90% of the run), the LambdaLR that applies them, and the AdamW
weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.train.config import TrainConfig
from deepseekmoe.train.optim import build_optimizer, build_scheduler, decay_step, lr_at, param_groups


def cfg(**kw: object) -> TrainConfig:
    return TrainConfig(**{"lr": 1.0, "warmup_steps": 10, "max_steps": 100, **kw})


def test_warmup_is_linear_and_reaches_peak_at_its_last_step() -> None:
    c = cfg()
    assert [lr_at(s, c) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(9, c) == 1.0  # warmup end
    assert lr_at(10, c) == 1.0


def test_step_schedule_decays_by_0316_at_80_and_90_percent() -> None:
    c = cfg()
    assert lr_at(79, c) == 1.0
    assert lr_at(80, c) == pytest.approx(0.316, abs=0, rel=1e-15)
    assert lr_at(89, c) == pytest.approx(0.316, rel=1e-15)
    assert lr_at(90, c) == pytest.approx(0.316 ** 2, rel=1e-15)
    assert lr_at(99, c) == pytest.approx(0.099856, rel=1e-12)


def test_step_boundaries_survive_float_rounding() -> None:
    # 0.9 * 10 = 9.000000000000002 in floating point: the decay must still start at step 9, not 10
    assert decay_step(0.9, 10) == 9
    assert decay_step(0.8, 10) == 8
    c = cfg(max_steps=10, warmup_steps=2)
    assert [round(lr_at(s, c), 6) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 1, 0.316, 0.099856]


def test_step_schedule_with_custom_points_and_factor() -> None:
    c = cfg(step_decay_at=[0.5], step_decay_factor=0.1)
    assert lr_at(49, c) == 1.0 and lr_at(50, c) == pytest.approx(0.1)


def test_cosine_schedule_hand_values() -> None:
    c = cfg(schedule="cosine", min_lr_ratio=0.1)  # decays over steps 10..100 (span 90)
    assert lr_at(9, c) == 1.0
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_at(40, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 3)))
    assert lr_at(100, c) == pytest.approx(0.1)


def test_constant_schedule_after_warmup() -> None:
    c = cfg(schedule="constant")
    assert lr_at(4, c) == pytest.approx(0.5)
    assert {lr_at(s, c) for s in range(9, 100)} == {1.0}


def test_no_warmup_starts_at_peak() -> None:
    assert lr_at(0, cfg(warmup_steps=0)) == 1.0


def test_scheduler_drives_the_optimizer_with_lr_at() -> None:
    c = cfg(lr=3e-3, max_steps=20, warmup_steps=4)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=c.lr)
    sched = build_scheduler(opt, c)
    seen = []
    for _ in range(c.max_steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, c) for s in range(c.max_steps)], rel=1e-12)


def test_weight_decay_groups(make_config) -> None:
    model = Transformer(make_config(tie_word_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter once (tied head once)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert {names[id(p)].rsplit(".", 1)[0].split(".")[-1] for p in no_decay["params"]} == {
        "input_layernorm", "post_attention_layernorm", "norm"}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"embed_tokens.weight", "layers.0.mlp.gate.weight", "layers.0.mlp.experts.gate_up_proj"} <= decayed


def test_optimizer_uses_the_paper_betas(make_config) -> None:
    opt = build_optimizer(Transformer(make_config()), TrainConfig())
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
