"""Losses (paper Eqs. 12-17): hand-computed expert- and device-level balance cases, identities, z-loss, LM loss,
their sum, and the gradient path through P_i."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepseekmoe.losses import (
    device_balance_loss, expert_balance_loss, lm_loss, total_loss, z_loss,
)
from deepseekmoe.model.router import RouterOutput, TopKRouter


def routing(idx: list[list[int]], probs: list[list[float]] | None, batch_size: int = 1,
            logits: list[list[float]] | None = None) -> RouterOutput:
    idx_TK = torch.tensor(idx)
    e = len(probs[0]) if probs is not None else int(idx_TK.max()) + 1
    probs_TE = torch.tensor(probs) if probs is not None else None
    if logits is None and probs_TE is not None:
        logits = probs_TE.log().tolist()
    logits_TE = torch.tensor(logits) if logits is not None else None
    weight = probs_TE.gather(1, idx_TK) if probs_TE is not None else torch.ones(idx_TK.shape)
    return RouterOutput(idx_TK, weight, probs_TE, logits_TE, torch.bincount(idx_TK.reshape(-1), minlength=e),
                        batch_size)


# A small case: E = 4 experts, K = 2, T = 4 tokens of one sequence.
HAND_PROBS = [[0.40, 0.30, 0.20, 0.10],
              [0.10, 0.50, 0.30, 0.10],
              [0.60, 0.10, 0.20, 0.10],
              [0.25, 0.25, 0.40, 0.10]]
HAND_IDX = [[0, 1], [1, 2], [0, 2], [2, 0]]
# selections per expert: 3, 2, 3, 0 -> f_i = N'/(K'T) * count = 4/8 * count
HAND_F = [1.5, 1.0, 1.5, 0.0]
# P_i = column means of HAND_PROBS
HAND_P = [1.35 / 4, 1.15 / 4, 1.10 / 4, 0.40 / 4]


def test_expert_loss_is_alpha_under_uniform_routing():
    # every expert chosen equally often (twice in 8 slots) and s_{i,t} = 1/E everywhere: f_i = 1, P_i = 1/4
    r = routing([[0, 1], [2, 3], [1, 2], [3, 0]], [[0.25] * 4] * 4)
    assert expert_balance_loss(r, alpha=0.01).item() == pytest.approx(0.01, rel=1e-6)
    assert expert_balance_loss(r, alpha=0.01, seq_aux=False).item() == pytest.approx(0.01, rel=1e-6)
    # uniform over a 2-sequence batch with 8 experts, top-1
    r2 = routing([[e] for e in range(8)] * 2, [[0.125] * 8] * 16, batch_size=2)
    assert expert_balance_loss(r2, alpha=0.003).item() == pytest.approx(0.003, rel=1e-6)


def test_expert_loss_hand_case():
    assert sum(HAND_F) == pytest.approx(4.0)  # f_i average to 1 by construction
    expected = sum(f * p for f, p in zip(HAND_F, HAND_P))
    assert expected == pytest.approx(1.20625)
    r = routing(HAND_IDX, HAND_PROBS)
    assert expert_balance_loss(r, alpha=0.1).item() == pytest.approx(0.1 * 1.20625, rel=1e-6)


def test_seq_aux_per_sequence_versus_batch():
    # E = 2, K = 1, two sequences of 2 tokens. Sequence 1 sends everything to expert 0, sequence 2 to expert 1.
    probs = [[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]]
    r = routing([[0], [0], [1], [1]], probs, batch_size=2)
    # per sequence: f = (2, 0), P = (0.8, 0.2) -> 1.6;  f = (0, 2), P = (0.3, 0.7) -> 1.4;  mean 1.5
    assert expert_balance_loss(r, alpha=1.0, seq_aux=True).item() == pytest.approx(1.5, rel=1e-6)
    # over the batch the load looks perfect: f = (1, 1), P = (0.55, 0.45) -> 1.0
    assert expert_balance_loss(r, alpha=1.0, seq_aux=False).item() == pytest.approx(1.0, rel=1e-6)


def test_device_loss_hand_case():
    # D = 2 groups {0, 1}, {2, 3}: f' = group means of f, P' = group sums of P
    f_dev = [(1.5 + 1.0) / 2, (1.5 + 0.0) / 2]
    p_dev = [(1.35 + 1.15) / 4, (1.10 + 0.40) / 4]
    expected = sum(f * p for f, p in zip(f_dev, p_dev))
    assert expected == pytest.approx(1.0625)
    r = routing(HAND_IDX, HAND_PROBS)
    assert device_balance_loss(r, alpha=0.05, num_groups=2).item() == pytest.approx(0.05 * 1.0625, rel=1e-6)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_device_loss_identities(seq_aux):
    torch.manual_seed(1)
    b, s, e, k = 3, 5, 8, 2
    probs = torch.softmax(torch.randn(b * s, e) * 2, dim=-1)
    idx = probs.topk(k, dim=-1).indices
    r = routing(idx.tolist(), probs.tolist(), batch_size=b)
    # D = E: one expert per group, so f'_i = f_i and P'_i = P_i -> the expert-level loss
    torch.testing.assert_close(device_balance_loss(r, 0.05, num_groups=e, seq_aux=seq_aux),
                               expert_balance_loss(r, 0.05, seq_aux=seq_aux))
    # D = 1: f' = mean f = 1 (K' selections per token) and P' = sum P = 1 (softmax) -> alpha2, whatever the routing
    assert device_balance_loss(r, 0.05, num_groups=1, seq_aux=seq_aux).item() == pytest.approx(0.05, rel=1e-6)
    with pytest.raises(ValueError, match="n_device_groups=3 does not divide n_routed_experts=8"):
        device_balance_loss(r, 0.05, num_groups=3)


def test_z_loss_value():
    # logsumexp rows: log(1 + 1) = ln 2 and log(3 + 1) = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    r = routing([[0], [0]], [[0.5, 0.5], [0.75, 0.25]], logits=[[0.0, 0.0], [math.log(3.0), 0.0]])
    assert z_loss(r, alpha=0.001).item() == pytest.approx(0.001 * 2.5 * math.log(2) ** 2, rel=1e-6)


def test_lm_loss_equals_cross_entropy():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(lm_loss(logits, targets), F.cross_entropy(logits.view(10, 11), targets.view(10)))
    targets[0, :3] = -100  # ignored positions
    torch.testing.assert_close(lm_loss(logits, targets),
                               F.cross_entropy(logits.view(10, 11), targets.view(10), ignore_index=-100))
    assert lm_loss(logits.bfloat16(), targets).dtype == torch.float32


def test_total_loss_sums_the_parts_and_skips_hash_routers(make_config):
    cfg = make_config(n_routed_experts=4, aux_loss_alpha=0.01, device_aux_loss_alpha=0.05, n_device_groups=2,
                      z_loss_alpha=0.001, seq_aux=True)
    learned = routing(HAND_IDX, HAND_PROBS)
    hashed = routing([[1], [3], [0], [2]], None)
    logits, targets = torch.randn(1, 4, 97), torch.randint(0, 97, (1, 4))
    parts = total_loss(logits, targets, [learned, hashed, learned], cfg)
    lm = lm_loss(logits, targets)
    torch.testing.assert_close(parts.lm, lm)
    torch.testing.assert_close(parts.expert_balance, 2 * expert_balance_loss(learned, 0.01))
    torch.testing.assert_close(parts.device_balance, 2 * device_balance_loss(learned, 0.05, 2))
    torch.testing.assert_close(parts.z, 2 * z_loss(learned, 0.001))
    torch.testing.assert_close(parts.total, lm + parts.expert_balance + parts.device_balance + parts.z)
    only_hash = total_loss(logits, targets, [hashed], cfg)
    assert only_hash.expert_balance.item() == only_hash.device_balance.item() == only_hash.z.item() == 0.0
    torch.testing.assert_close(only_hash.total, lm)
    with pytest.raises(ValueError, match="hash router has none"):
        expert_balance_loss(hashed, 0.01)


def test_disabled_coefficients_give_zero(make_config):
    cfg = make_config(n_routed_experts=4, aux_loss_alpha=0.0)
    parts = total_loss(torch.randn(1, 4, 97), torch.randint(0, 97, (1, 4)), [routing(HAND_IDX, HAND_PROBS)], cfg)
    assert parts.expert_balance.item() == parts.device_balance.item() == parts.z.item() == 0.0
    torch.testing.assert_close(parts.total, parts.lm)


def test_balance_gradient_flows_to_the_router_through_p(make_config):
    cfg = make_config(n_routed_experts=8, num_experts_per_tok=2)
    router = TopKRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    x = torch.randn(2 * 6, cfg.hidden_size)
    r = router(x, batch_size=2)
    expert_balance_loss(r, alpha=0.01, seq_aux=True).backward()
    got = router.weight.grad.clone()
    assert got.abs().sum() > 0
    # reference: f is a constant (counts of hard choices), only P = mean_t softmax(x W^T) carries gradient
    w = router.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(x @ w.t(), dim=-1).view(2, 6, 8)
    idx = r.topk_idx_TK.view(2, 12)
    f = torch.stack([torch.bincount(idx[g], minlength=8).float() * 8 / (2 * 6) for g in range(2)])
    (0.01 * (f * probs.mean(dim=1)).sum(-1).mean()).backward()
    torch.testing.assert_close(got, w.grad)
