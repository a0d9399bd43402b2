"""AdamW with weight-decay parameter groups, and the learning-rate schedules.

Weight decay: applied to every parameter with two or more dimensions (attention and FFN matrices, the stacked
routed-expert weights, router centroids, embeddings and LM head) and not to one-dimensional ones (RMSNorm weights;
the model has no biases, but any would land here too). Decaying a norm's gain pulls it towards zero, which only
shrinks the activations it exists to scale; this is the common GPT-style choice, since the paper does not say.

Schedules (`lr_at(step, cfg)` is the LR used by optimizer step `step`, counted from 0):
  * warmup: lr * (step + 1) / warmup_steps for step < warmup_steps, so the last warmup step reaches lr;
  * step (the paper's): lr, multiplied by step_decay_factor (0.316) once step >= 0.8 * max_steps and again once
    step >= 0.9 * max_steps;
  * cosine: from lr down to min_lr_ratio * lr over the steps after warmup;
  * constant: lr after warmup.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and vectors (not decayed), in the model's parameter order."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():  # parameters() yields a tied weight once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        drops = sum(step >= decay_step(frac, cfg.max_steps) for frac in cfg.step_decay_at)
        return cfg.lr * cfg.step_decay_factor ** drops
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def decay_step(fraction: float, max_steps: int) -> int:
    """First step at or past `fraction` of the run (0.9 * 10 is 9, despite 0.9 * 10 = 9.000000000000002)."""
    return math.ceil(fraction * max_steps - 1e-9)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor at step s is lr_at(s) / lr; its state_dict is just the step counter."""
    def factor(step: int) -> float:
        return lr_at(step, cfg) / cfg.lr if cfg.lr > 0 else 0.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
