"""An optimizer step in parts on the CPU runtime's workers.

With the calling thread at one intra-op thread, AdamW's elementwise update of every parameter (a dozen passes over
the parameters and their two moments) would use one core: a tenth of tiny-deepseekmoe's training step. Adam,
AdamW and SGD update each parameter from that parameter's own tensors only, so the parameters are cut into
contiguous runs of about equal size and each run is stepped, on whichever worker takes it, by a shallow copy of
the optimizer that holds just that run and shares the optimizer's state: every parameter gets the update one
step over all would give it, bit for bit, whoever ran it (tests/test_runtime_threads.py).

    install(runtime, optimizer)   # before a learning-rate scheduler wraps optimizer.step
"""

from __future__ import annotations

import types
from collections import OrderedDict
from typing import Any

import torch
from torch.optim import optimizer as base

from .linear import PARTS_PER_WORKER, Runner, split

PER_PARAMETER = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
"""Optimizers whose update of a parameter reads only that parameter's tensors and hyperparameters."""
MIN_STEP_ELEMENTS = 1 << 20
"""Parameters (elements) from which a step runs in parts; a smaller model steps in the calling thread."""


def install(runtime: Runner, optimizer: torch.optim.Optimizer) -> bool:
    """Make `optimizer.step()` run in parts on the runtime's workers where that keeps its bits (a PER_PARAMETER
    type, every parameter on the CPU); returns whether it does. A scheduler made afterwards wraps this step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if type(optimizer) not in PER_PARAMETER or any(p.device.type != "cpu" for p in params):
        return False
    optimizer.step = types.MethodType(lambda opt, closure=None: _step(runtime, opt, closure), optimizer)
    return True


def _hooked(optimizer: torch.optim.Optimizer) -> bool:
    """Whether step hooks are registered (they would run once a part: such an optimizer steps as it is)."""
    return bool(optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or getattr(base, "_global_optimizer_pre_hooks", None)
                or getattr(base, "_global_optimizer_post_hooks", None))


def _step(runtime: Runner, optimizer: torch.optim.Optimizer, closure: Any = None) -> Any:
    step = type(optimizer).step
    if closure is not None or runtime.in_worker() or _hooked(optimizer):
        return step(optimizer, closure)
    parts = _parts(optimizer, runtime.workers * PARTS_PER_WORKER)
    if len(parts) < 2:
        return step(optimizer)

    def run(groups: list[dict]) -> None:
        shadow = object.__new__(type(optimizer))
        shadow.__dict__.update(optimizer.__dict__)  # the same state, defaults and everything else
        shadow.__dict__.pop("step", None)
        shadow._optimizer_step_pre_hooks, shadow._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
        shadow.param_groups = groups
        step(shadow)
    runtime.run_parts([lambda groups=groups: run(groups) for groups in parts])
    return None


def _parts(optimizer: torch.optim.Optimizer, parts: int) -> list[list[dict]]:
    """The parameters with gradients, in order, cut into at most `parts` contiguous runs of about equal numbers
    of elements (none empty), each as param groups with the optimizer's hyperparameters."""
    items = [(i, p) for i, g in enumerate(optimizer.param_groups) for p in g["params"] if p.grad is not None]
    if sum(p.numel() for _, p in items) < MIN_STEP_ELEMENTS:
        return []
    out = []
    for run in split(items, [p.numel() for _, p in items], parts):
        groups: dict[int, dict] = {}
        for i, p in run:
            groups.setdefault(i, {**optimizer.param_groups[i], "params": []})["params"].append(p)
        out.append(list(groups.values()))
    return out
