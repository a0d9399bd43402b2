"""An optimizer step in parts on the CPU runtime's workers, each part cache-sized.

With the calling thread at one intra-op thread, AdamW's elementwise update of every parameter (a dozen passes over
the parameters and their two moments) would use one core: a tenth of tiny-deepseekmoe's training step. Adam,
AdamW and SGD update each element of a parameter from that element of the parameter's own tensors (the parameter,
its gradient, its moments) and from scalars only. So every step after the first (once each parameter has its
state) cuts a parameter of over `CUT_FROM_ELEMENTS` into flat pieces of `PIECE_ELEMENTS`: views of the parameter,
its gradient and its same-shaped state, with a copy of its scalar state (the step count) each. The pieces and the
other parameters are cut into contiguous runs of about equal size, and each run is stepped, on whichever worker
takes it, by a shallow copy of the optimizer that holds just that run. The default (single-tensor) update runs all
its passes over one tensor before the next, so a piece's dozen passes stay in the cache instead of streaming a
1.5 GB expert stack from memory a dozen times (the 16B shape's AdamW step in 0.25x the time, benchmarks/README.md).
Every element gets the update one step over all would give it, bit for bit, whoever ran it
(tests/test_runtime_threads.py): pieces start at multiples of PIECE_ELEMENTS, so the vectorised loops cover the
same elements as over the whole tensor.

    install(runtime, optimizer)   # before a learning-rate scheduler wraps optimizer.step
"""

from __future__ import annotations

import types
from collections import OrderedDict, defaultdict
from typing import Any, NamedTuple

import torch
from torch.optim import optimizer as base

from .linear import PARTS_PER_WORKER, Runner, split

PER_PARAMETER = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
"""Optimizers whose update of a parameter reads only that parameter's tensors and hyperparameters."""
MIN_STEP_ELEMENTS = 1 << 20
"""Parameters (elements) from which a step runs in parts; a smaller model steps in the calling thread."""
PIECE_ELEMENTS = 1 << 18
"""Elements of a parameter's piece: its parameter, gradient and two moments (4 MB in fp32) stay in the cache over
the update's passes. A multiple of every vector width."""
CUT_FROM_ELEMENTS = 1 << 22
"""Parameters of more elements than this are cut into pieces (64 MB of fp32 tensors to update, more than a
last-level cache); smaller ones gained nothing (tiny-deepseekmoe's 1.4M-element experts: 1.10x the time cut)."""


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


class _Piece(NamedTuple):
    """Elements [start, end) of parameter `param` of group `group` (a whole parameter: start 0, end None)."""
    group: int
    param: torch.Tensor
    start: int = 0
    end: int | None = None


def _step(runtime: Runner, optimizer: torch.optim.Optimizer, closure: Any = None) -> Any:
    step = type(optimizer).step
    if closure is not None or runtime.in_worker() or _hooked(optimizer):
        return step(optimizer, closure)
    parts = _parts(optimizer, runtime.workers * PARTS_PER_WORKER)
    if len(parts) < 2:
        return step(optimizer)
    for piece in (piece for part in parts for piece in part if piece.start == 0):
        optimizer.state[piece.param]  # every parameter's state in order (the state dict's order), made in place
    stepped: dict[int, tuple[torch.Tensor, dict]] = {}  # a cut parameter and its first piece's state, stepped

    def run(pieces: list[_Piece]) -> None:
        shadow = object.__new__(type(optimizer))
        shadow.__dict__.update(optimizer.__dict__)  # the same defaults and everything else
        shadow.__dict__.pop("step", None)
        shadow._optimizer_step_pre_hooks, shadow._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
        shadow.state, groups, firsts = defaultdict(dict), {}, []
        for piece in pieces:
            tensor, state = _view(piece, optimizer.state[piece.param])
            shadow.state[tensor] = state
            groups.setdefault(piece.group, {**optimizer.param_groups[piece.group], "params": []})["params"].append(
                tensor)
            if piece.end is not None and piece.start == 0:
                firsts.append((piece.param, state))
        shadow.param_groups = list(groups.values())
        step(shadow)
        stepped.update((id(param), (param, state)) for param, state in firsts)
    runtime.run_parts([lambda pieces=pieces: run(pieces) for pieces in parts])
    for param, state in stepped.values():
        whole = optimizer.state[param]
        for name, value in state.items():
            if not _same_shape(whole.get(name), param):
                whole[name] = value  # the step count: a copy, stepped once as every piece's was
    return None


def _same_shape(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _view(piece: _Piece, state: dict) -> tuple[torch.Tensor, dict]:
    """The tensor a shadow optimizer steps for `piece`, and its state: views of the same-shaped state, copies of
    the rest (a whole parameter: itself and its own state, which a first step fills in)."""
    if piece.end is None:
        return piece.param, state
    a, b = piece.start, piece.end
    view = piece.param.detach().view(-1)[a:b]
    view.grad = piece.param.grad.view(-1)[a:b]
    return view, {name: value.view(-1)[a:b] if _same_shape(value, piece.param)
                  else value.clone() if isinstance(value, torch.Tensor) else value for name, value in state.items()}


def _cuttable(param: torch.Tensor, state: dict) -> bool:
    """Whether `param` may be stepped in flat pieces: large, contiguous with a dense contiguous gradient, and
    state already made (the first step makes it whole) whose every tensor is the parameter's shape or a scalar."""
    grad = param.grad
    if param.numel() <= max(PIECE_ELEMENTS, CUT_FROM_ELEMENTS) or not state or not param.is_contiguous() or grad is None \
            or grad.is_sparse or not grad.is_contiguous() or grad.shape != param.shape:
        return False
    return all(value.is_contiguous() if _same_shape(value, param) else value.numel() == 1
               for value in state.values() if isinstance(value, torch.Tensor))


def _parts(optimizer: torch.optim.Optimizer, parts: int) -> list[list[_Piece]]:
    """The parameters with gradients, in order, large ones cut into pieces (`_cuttable`), cut into at most `parts`
    contiguous runs of about equal numbers of elements (none empty)."""
    items = [(i, p) for i, g in enumerate(optimizer.param_groups) for p in g["params"] if p.grad is not None]
    if sum(p.numel() for _, p in items) < MIN_STEP_ELEMENTS:
        return []
    pieces = []
    for i, p in items:
        if p in optimizer.state and _cuttable(p, optimizer.state[p]):
            n = p.numel()
            pieces += [_Piece(i, p, a, min(a + PIECE_ELEMENTS, n)) for a in range(0, n, PIECE_ELEMENTS)]
        else:
            pieces.append(_Piece(i, p))
    return split(pieces, [p.param.numel() if p.end is None else p.end - p.start for p in pieces], parts)
