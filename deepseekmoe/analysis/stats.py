"""Routing statistics of one MoE layer, accumulated over any number of batches.

Shape legend: T tokens (B*S), E routed experts, K experts per token, V vocabulary.

Definitions (all over the tokens seen so far):
  load_E            assignments each expert processed (RouterOutput.expert_counts_E, summed)
  max_over_mean     max(load) / mean(load): 1.0 is perfect balance, E/K when every token picks the same experts
  cv                coefficient of variation of the load, std/mean with the population std (0 = perfect balance)
  load_entropy      entropy (nats) of load/sum(load); normalised by log(E) so 1.0 is uniform
  token_entropy     mean over tokens of the entropy (nats) of the routing distribution s_{.,t}: how decided the
                    router is per token (log(E) = undecided); None for routers without probabilities (hash)
  gate_mass         mean over tokens of the summed gate weights of the chosen routed experts (sum of the top-k
                    weights): the routed experts' share of the MoE output, K/E for a uniform softmax router without
                    renormalisation, 1.0 for hash routing or renormalised gates
  dead_experts      experts that received no token at all
  coactivation_EE   C[i, j] = tokens that selected both i and j (i != j); C[i, i] = tokens that selected i
  top tokens        per expert, the token ids routed to it most consistently: share = (occurrences of the token
                    routed to this expert) / (occurrences of the token), among tokens seen at least `min_count`
                    times; ties broken by count
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..errors import UserValueError
from ..model.router import RouterOutput


class LayerRoutingStats:
    """Accumulates the routing of one MoE layer. Feed it RouterOutputs (and the token ids for top tokens)."""

    def __init__(self, num_experts: int, vocab_size: int | None = None) -> None:
        self.num_experts = num_experts
        self.load_E = torch.zeros(num_experts, dtype=torch.long)
        self.coactivation_EE = torch.zeros(num_experts, num_experts, dtype=torch.long)
        self.token_expert_VE = (torch.zeros(vocab_size, num_experts, dtype=torch.long)
                                if vocab_size is not None else None)
        self.token_count_V = torch.zeros(vocab_size or 0, dtype=torch.long)
        self.num_tokens = 0
        self._entropy_sum = 0.0
        self._gate_mass_sum = 0.0
        self._has_probs = True

    def update(self, r: RouterOutput, input_ids: torch.Tensor | None = None) -> None:
        """Add one batch: r for T tokens; input_ids (B, S) or (T,) for the top-token counts."""
        idx_TK = r.topk_idx_TK.detach().cpu()
        t = idx_TK.shape[0]
        self.num_tokens += t
        self.load_E += r.expert_counts_E.detach().cpu().long()
        self._gate_mass_sum += float(r.topk_weight_TK.detach().double().sum())
        chosen_TE = torch.zeros(t, self.num_experts, dtype=torch.long).scatter_(1, idx_TK, 1)
        self.coactivation_EE += chosen_TE.t() @ chosen_TE
        if r.probs_TE is None:
            self._has_probs = False
        else:
            p = r.probs_TE.detach().float().cpu()
            self._entropy_sum += float(-(p * p.clamp_min(1e-30).log()).sum())
        if self.token_expert_VE is not None and input_ids is not None:
            ids_T = input_ids.detach().reshape(-1).cpu()
            flat = (ids_T.unsqueeze(1) * self.num_experts + idx_TK).reshape(-1)
            self.token_expert_VE.view(-1).index_add_(0, flat, torch.ones_like(flat))
            self.token_count_V.index_add_(0, ids_T, torch.ones_like(ids_T))

    # ------------------------------------------------------------------ summaries
    def max_over_mean(self) -> float:
        load = self.load_E.double()
        return float(load.max() / load.mean()) if load.sum() > 0 else float("nan")

    def cv(self) -> float:
        load = self.load_E.double()
        return float(load.std(unbiased=False) / load.mean()) if load.sum() > 0 else float("nan")

    def load_entropy(self) -> float:
        total = self.load_E.sum()
        if total == 0:
            return float("nan")
        q = self.load_E.double() / total
        return float(-(q[q > 0] * q[q > 0].log()).sum())

    def token_entropy(self) -> float | None:
        if not self._has_probs or self.num_tokens == 0:
            return None
        return self._entropy_sum / self.num_tokens

    def gate_mass(self) -> float:
        return self._gate_mass_sum / self.num_tokens if self.num_tokens else float("nan")

    def dead_experts(self) -> list[int]:
        return torch.nonzero(self.load_E == 0).flatten().tolist()

    def top_tokens(self, expert: int, n: int = 10, min_count: int = 5) -> list[tuple[int, int, float]]:
        """[(token_id, times routed to `expert`, share of the token's occurrences)], best first."""
        if self.token_expert_VE is None:
            return []
        counts_V = self.token_expert_VE[:, expert]
        share_V = counts_V.double() / self.token_count_V.clamp_min(1).double()
        eligible = (self.token_count_V >= min_count) & (counts_V > 0)
        ids = torch.nonzero(eligible).flatten()
        if ids.numel() == 0:
            return []
        key = share_V[ids] * 1e9 + counts_V[ids].double()  # share first, then count
        best = ids[torch.argsort(key, descending=True)[:n]]
        return [(int(i), int(counts_V[i]), float(share_V[i])) for i in best]

    def summary(self, decode: Callable[[int], str] | None = None, top_n: int = 10,
                min_count: int = 5) -> dict[str, Any]:
        """A JSON-ready dict of every statistic; `decode` turns a token id into text for the top tokens."""
        e = self.num_experts
        out: dict[str, Any] = {
            "num_experts": e,
            "num_tokens": self.num_tokens,
            "load": self.load_E.tolist(),
            "max_over_mean": self.max_over_mean(),
            "cv": self.cv(),
            "load_entropy": self.load_entropy(),
            "load_entropy_normalized": self.load_entropy() / math.log(e) if e > 1 else 1.0,
            "token_entropy": self.token_entropy(),
            "gate_mass": self.gate_mass(),
            "dead_experts": self.dead_experts(),
            "coactivation": self.coactivation_EE.tolist(),
        }
        if self.token_expert_VE is not None:
            out["top_tokens"] = [
                [{"id": tid, "text": decode(tid) if decode else str(tid), "count": c, "share": round(s, 4)}
                 for tid, c, s in self.top_tokens(i, top_n, min_count)]
                for i in range(e)
            ]
        return out


class RoutingStats:
    """One LayerRoutingStats per MoE layer of a model."""

    def __init__(self, num_experts: int, num_layers: int, vocab_size: int | None = None) -> None:
        self.layers = [LayerRoutingStats(num_experts, vocab_size) for _ in range(num_layers)]

    def update(self, router_outputs: list[RouterOutput], input_ids: torch.Tensor | None = None) -> None:
        if len(router_outputs) != len(self.layers):
            raise UserValueError(f"got {len(router_outputs)} router outputs for {len(self.layers)} MoE layers")
        for layer, r in zip(self.layers, router_outputs):
            layer.update(r, input_ids)

    def summary(self, decode: Callable[[int], str] | None = None, top_n: int = 10) -> list[dict[str, Any]]:
        return [layer.summary(decode, top_n) for layer in self.layers]
