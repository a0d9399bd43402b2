"""The paper's expert-specialization experiments (Sec. 4.5), run on any checkpoint from outside the model code.

Shape legend: T tokens (B*S), E routed experts, K experts per token.

`rerouted(model, ...)` is a context manager that, for every MoE layer, temporarily replaces the forward of the
router module (`mlp.gate`) by one that calls the original router and then re-selects experts from its
probabilities s_{i,t}; with `disable_shared` it also replaces the forward of `mlp.shared_experts` by zeros. It sets
and removes instance attributes only, so leaving the block restores the model exactly. Gate weights stay the raw
probabilities of the chosen experts (renormalised among them only when the config says `norm_topk_prob`). Routing
under the context is dropless (a configured capacity factor is not applied). Routers without probabilities
(hash) cannot be re-routed and raise ValueError.

Experiments (losses in nats per token over one fixed list of validation windows):
  * Figure 4: disable the top `round(x * E)` routed experts of each token by probability, route to the top-K of
    the rest, x in {0, 1/16, ..., 4/16};
  * shared expert off, one more routed expert on (K + 1), i.e. the same compute;
  * Figure 5: evaluate with K' routed experts, K' = K-4 .. K (at least 1), without retraining.
"""

from __future__ import annotations

import contextlib
from fractions import Fraction
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from ..errors import UserValueError
from ..model import Transformer
from ..model.router import RouterOutput

Batch = tuple[torch.Tensor, torch.Tensor]
DISABLE_RATIOS = (0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16)


def reroute(probs_TE: torch.Tensor, num_disabled: int, top_k: int, norm_topk_prob: bool = False,
            batch_size: int = 1, logits_TE: torch.Tensor | None = None) -> RouterOutput:
    """Mask each token's `num_disabled` most probable experts, then take the top-`top_k` of the rest."""
    t, e = probs_TE.shape
    if num_disabled + top_k > e:
        raise UserValueError(f"cannot disable {num_disabled} and still activate {top_k} of {e} routed experts")
    # The (d+1)-th..(d+K)-th most probable experts are exactly the top-K once the top d are masked.
    weight_TK, idx_TK = torch.topk(probs_TE, num_disabled + top_k, dim=-1)
    weight_TK, idx_TK = weight_TK[:, num_disabled:], idx_TK[:, num_disabled:]
    if norm_topk_prob and top_k > 1:
        weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=e)
    return RouterOutput(idx_TK.contiguous(), weight_TK.contiguous(), probs_TE, logits_TE, counts_E, batch_size)


def num_disabled_for(ratio: float, num_experts: int) -> int:
    """Experts masked for a ratio x of the routed experts (x * E rounded to the nearest integer)."""
    return int(round(ratio * num_experts))


@contextlib.contextmanager
def rerouted(model: Transformer, *, disable_ratio: float = 0.0, top_k: int | None = None,
             disable_shared: bool = False) -> Iterator[None]:
    """Route every MoE layer differently inside the block (see the module docstring); restores on exit."""
    cfg = model.config
    if not cfg.is_moe:
        raise UserValueError("a dense model has no routing to change")
    if cfg.router == "hash":
        raise UserValueError("the hash router has no routing probabilities, so its experts cannot be re-ranked")
    if disable_shared and cfg.n_shared_experts == 0:
        raise UserValueError("the model has no shared experts to disable")
    assert cfg.n_routed_experts is not None
    k = cfg.num_experts_per_tok if top_k is None else top_k
    d = num_disabled_for(disable_ratio, cfg.n_routed_experts)
    if k < 1 or d + k > cfg.n_routed_experts:
        raise UserValueError(f"top_k={k} with {d} disabled experts does not fit {cfg.n_routed_experts} routed experts")
    patched: list[torch.nn.Module] = []
    try:
        for moe in model.moe_layers():
            moe.gate.forward = _rerouting_forward(moe.gate, d, k, cfg.norm_topk_prob)
            patched.append(moe.gate)
            if disable_shared and moe.shared_experts is not None:
                moe.shared_experts.forward = torch.zeros_like
                patched.append(moe.shared_experts)
        yield
    finally:
        for module in patched:
            del module.forward  # the instance attribute goes; the class's forward is back


def _rerouting_forward(gate: torch.nn.Module, num_disabled: int, top_k: int,
                       norm_topk_prob: bool) -> Callable[..., RouterOutput]:
    original = type(gate).forward

    def forward(x_TD: torch.Tensor, batch_size: int, input_ids: torch.Tensor | None = None) -> RouterOutput:
        r = original(gate, x_TD, batch_size=batch_size, input_ids=input_ids)
        return reroute(r.probs_TE, num_disabled, top_k, norm_topk_prob, batch_size, r.logits_TE)

    return forward


@torch.no_grad()
def evaluate_loss(model: Transformer, batches: Iterable[Batch],
                  on_output: Callable[[Any, torch.Tensor], None] | None = None) -> float:
    """Mean next-token cross-entropy (nats per token) over all target tokens of `batches`."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        out = model(inputs)
        logits = out.logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
        if on_output is not None:
            on_output(out, inputs)
    if count == 0:
        raise UserValueError("no validation tokens to evaluate on")
    return total / count


def disable_top_experts(model: Transformer, batches: list[Batch],
                        ratios: Iterable[float] = DISABLE_RATIOS) -> list[dict[str, Any]]:
    """Figure 4: loss with the top fraction x of each token's routed experts disabled."""
    e = model.config.n_routed_experts or 0
    rows = []
    for x in ratios:
        d = num_disabled_for(x, e)
        if d + model.config.num_experts_per_tok > e:
            continue
        with rerouted(model, disable_ratio=x):
            loss = evaluate_loss(model, batches)
        rows.append({"ratio": x, "ratio_label": _sixteenths(x), "num_disabled": d, "loss": loss})
    return rows


def _sixteenths(x: float) -> str:
    """The paper's axis labels: 0, 1/16, 2/16, ...; other ratios as a reduced fraction."""
    n = x * 16
    return "0" if x == 0 else f"{round(n)}/16" if abs(n - round(n)) < 1e-9 else str(Fraction(x).limit_denominator(64))


def vary_top_k(model: Transformer, batches: list[Batch], ks: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """Figure 5: loss when K' routed experts are activated at evaluation (no retraining)."""
    k = model.config.num_experts_per_tok
    ks = list(ks) if ks is not None else list(range(max(1, k - 4), k + 1))
    rows = []
    for kk in ks:
        with rerouted(model, top_k=kk):
            rows.append({"top_k": kk, "loss": evaluate_loss(model, batches)})
    return rows


def shared_expert_swap(model: Transformer, batches: list[Batch], baseline: float | None = None) -> dict[str, Any]:
    """Shared expert(s) disabled and one more routed expert activated (same compute), against the normal model."""
    k = model.config.num_experts_per_tok
    if baseline is None:
        baseline = evaluate_loss(model, batches)
    with rerouted(model, top_k=k + 1, disable_shared=True):
        swapped = evaluate_loss(model, batches)
    return {"normal_loss": baseline, "swapped_loss": swapped, "routed_top_k": k + 1,
            "shared_experts_disabled": model.config.n_shared_experts}
