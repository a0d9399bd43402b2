"""Losses as pure functions: LM cross-entropy, expert- and device-level balance (paper Eqs. 12-17), z-loss.

Notation: T tokens of one sequence (seq_aux=True) or of the whole batch (seq_aux=False), N' = E routed experts,
K' = K activated routed experts, s_{i,t} routing probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import UserValueError
from .model.router import RouterOutput
from .runtime.cpu import current as current_runtime
from .runtime.rows import cross_entropy


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in nats; logits (B, S, V), targets (B, S). While a CPU runtime is open its
    workers run the row-wise work in row blocks (runtime/rows.py: the same bits as F.cross_entropy)."""
    logits_NV, targets_N = logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    runtime = current_runtime()
    if runtime is None:
        return F.cross_entropy(logits_NV, targets_N, ignore_index=ignore_index)
    return cross_entropy(runtime, logits_NV, targets_N, ignore_index)


def _fraction_and_prob(r: RouterOutput, seq_aux: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """f (G, E) and P (G, E) over G groups of tokens (sequences if seq_aux, else one group).

    f_i = N' / (K' T) * #(tokens selecting i);  P_i = (1/T) sum_t s_{i,t}.  Selections are counted before any
    capacity drop (the router's choice is what the loss balances).
    """
    if r.probs_TE is None:
        raise UserValueError("balance losses need routing probabilities; the hash router has none")
    e, k = r.num_experts, r.top_k
    g = r.batch_size if seq_aux else 1
    probs_GTE = r.probs_TE.view(g, -1, e)
    t = probs_GTE.shape[1]
    idx_GR = r.topk_idx_TK.view(g, t * k)
    counts_GE = torch.zeros(g, e, device=probs_GTE.device).scatter_add_(
        1, idx_GR, torch.ones_like(idx_GR, dtype=torch.float32))
    f_GE = counts_GE * (e / (k * t))
    return f_GE, probs_GTE.mean(dim=1)


def expert_balance_loss(r: RouterOutput, alpha: float, seq_aux: bool = True) -> torch.Tensor:
    """L_ExpBal = alpha1 * sum_i f_i P_i (Eq. 12), averaged over sequences when seq_aux. Equals alpha1 when
    routing is perfectly uniform."""
    f_GE, p_GE = _fraction_and_prob(r, seq_aux)
    return alpha * (f_GE * p_GE).sum(dim=-1).mean()


def device_balance_loss(r: RouterOutput, alpha: float, num_groups: int, seq_aux: bool = True) -> torch.Tensor:
    """L_DevBal = alpha2 * sum_{d=1..D} f'_d P'_d (Eq. 15) with routed experts split into D contiguous groups:
    f'_d = mean of f_j over group d (Eq. 16), P'_d = sum of P_j over group d (Eq. 17)."""
    f_GE, p_GE = _fraction_and_prob(r, seq_aux)
    g, e = f_GE.shape
    if e % num_groups:
        raise UserValueError(f"n_device_groups={num_groups} does not divide n_routed_experts={e}")
    f_dev = f_GE.view(g, num_groups, -1).mean(dim=-1)
    p_dev = p_GE.view(g, num_groups, -1).sum(dim=-1)
    return alpha * (f_dev * p_dev).sum(dim=-1).mean()


def z_loss(r: RouterOutput, alpha: float) -> torch.Tensor:
    """Router z-loss (ST-MoE): alpha * mean_t logsumexp(logits_t)^2."""
    if r.logits_TE is None:
        raise UserValueError("z-loss needs router logits; the hash router has none")
    return alpha * torch.logsumexp(r.logits_TE, dim=-1).pow(2).mean()


@dataclass
class LossParts:
    total: torch.Tensor
    lm: torch.Tensor
    expert_balance: torch.Tensor
    device_balance: torch.Tensor
    z: torch.Tensor


def auxiliary_losses(router_outputs: list[RouterOutput], config: ModelConfig,
                     like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert-level, device-level, z) losses as the config asks, each summed over MoE layers; zeros shaped and
    placed like `like` where disabled. Hash layers have nothing to balance or regularise."""
    exp_bal = dev_bal = z = like.new_zeros(())
    for r in router_outputs:
        if r.probs_TE is None:
            continue
        if config.aux_loss_alpha > 0:
            exp_bal = exp_bal + expert_balance_loss(r, config.aux_loss_alpha, config.seq_aux)
        if config.device_aux_loss_alpha > 0:
            dev_bal = dev_bal + device_balance_loss(r, config.device_aux_loss_alpha, config.n_device_groups,
                                                    config.seq_aux)
        if config.z_loss_alpha > 0:
            z = z + z_loss(r, config.z_loss_alpha)
    return exp_bal, dev_bal, z


def total_loss(logits: torch.Tensor, targets: torch.Tensor, router_outputs: list[RouterOutput],
               config: ModelConfig) -> LossParts:
    """LM loss + the configured auxiliary losses, each summed over MoE layers."""
    lm = lm_loss(logits, targets)
    exp_bal, dev_bal, z = auxiliary_losses(router_outputs, config, lm)
    return LossParts(lm + exp_bal + dev_bal + z, lm, exp_bal, dev_bal, z)
