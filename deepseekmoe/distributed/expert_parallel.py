"""Expert parallelism: each rank of an EP group holds a contiguous block of ~E/ep routed experts per MoE layer.

Shape legend: T local tokens, D hidden, E routed experts (global), K experts per token, F expert hidden,
R = T*K (token, slot) rows sent, Q rows received, P = ep ranks in the group, L local experts (E/P; when P does
not divide E, blocks differ by one expert: see `expert_bounds`).

Dropless dispatch (`ExpertParallelExperts.forward`), the grouped single-device path stretched over the group:
  1. flatten the (token, slot) pairs and stable-sort them by expert id: rows bound for rank j are contiguous;
  2. exchange per-expert counts (all_to_all of an (E,) tensor) so every rank knows how many rows it receives;
  3. all_to_all the rows with variable split sizes;
  4. run the local experts on the received rows (ordered by source rank, then expert) with the single-device
     RoutedExperts.forward, one expert per row and gate 1, so the results come back in the received order;
  5. all_to_all the results back (the mirror exchange), scale by the gates, scatter-add.
Both exchanges are an autograd.Function whose backward is the mirror all_to_all, so gradients flow to the
inputs on the sending rank and to the expert weights on the receiving rank. A rank that receives no rows keeps
its expert weights in the graph, so every expert weight gets a gradient on every rank and the data-parallel
reduction of expert gradients never waits on a rank that skipped one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..errors import UserValueError
from ..model import Transformer
from ..model.experts import RoutedExperts, sort_by_expert


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all_to_all_single along dim 0: send input_splits[j] rows to rank j, receive
    output_splits[j] rows from rank j. Backward sends the gradients back the same way."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def expert_bounds(num_experts: int, ep: int) -> list[int]:
    """Block boundaries: EP rank j holds experts [bounds[j], bounds[j+1]). As even as possible; when ep does not
    divide E (63 routed experts over 2 ranks) the first E % ep ranks hold one expert more."""
    base, extra = divmod(num_experts, ep)
    return [j * base + min(j, extra) for j in range(ep + 1)]


class ExpertParallelExperts(RoutedExperts):
    """The routed experts [first, first + L) of one MoE layer; same interface as RoutedExperts, whose forward
    (whichever single-device implementation the layer was configured with) runs the local experts."""

    def __init__(self, experts: RoutedExperts, group: dist.ProcessGroup) -> None:
        nn.Module.__init__(self)
        for name, value in vars(experts).items():  # settings such as impl; parameters are replaced below
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.group = group
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        e = experts.num_experts
        if e < self.ep_size:
            raise UserValueError(f"ep={self.ep_size} exceeds n_routed_experts={e}: every EP rank needs an expert")
        self.num_experts, self.bounds = e, expert_bounds(e, self.ep_size)
        self.sizes = [b - a for a, b in zip(self.bounds, self.bounds[1:])]  # experts per EP rank
        self.first, self.num_local = self.bounds[self.ep_rank], self.sizes[self.ep_rank]
        block = slice(self.first, self.first + self.num_local)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[block].clone())  # (L, 2F, D)
        self.down_proj = nn.Parameter(experts.down_proj.detach()[block].clone())  # (L, D, F)

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        p, n_local = self.ep_size, self.num_local
        # 1. (token, slot) rows sorted by expert: the rows bound for EP rank j are contiguous
        order_R, token_of_row_R, counts_E = sort_by_expert(topk_idx_TK, self.num_experts)
        # 2. counts_PL[j, l]: rows rank j sends to my local expert l
        counts_PL = counts_E.new_empty(p * n_local)
        dist.all_to_all_single(counts_PL, counts_E, [n_local] * p, self.sizes, group=self.group)
        counts_PL = counts_PL.view(p, n_local)
        send = [int(c.sum()) for c in counts_E.cpu().split(self.sizes)]
        recv = counts_PL.sum(1).tolist()
        # 3. dispatch
        x_QD = all_to_all(x_TD[token_of_row_R], recv, send, self.group)
        # 4. run the local experts on the received rows (the single-device dispatch, one expert per row)
        local_id_Q = torch.arange(n_local, device=x_QD.device).repeat(p).repeat_interleave(
            counts_PL.reshape(-1), output_size=x_QD.shape[0])
        ones_Q1 = x_QD.new_ones(x_QD.shape[0], 1, dtype=torch.float32)
        y_QD = super().forward(x_QD, local_id_Q.unsqueeze(1), ones_Q1)
        if x_QD.shape[0] == 0:  # nothing received: keep x_QD and the weights in the graph, so that the mirror
            # all_to_all still runs in backward and the weights get (zero) gradients, as on the other ranks
            y_QD = x_QD + 0.0 * (self.gate_up_proj.sum() + self.down_proj.sum())
        # 5. combine
        y_RD = all_to_all(y_QD, send, recv, self.group)
        y_RD = y_RD * topk_weight_TK.reshape(-1)[order_R].unsqueeze(-1).to(y_RD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_of_row_R, y_RD)

    def extra_repr(self) -> str:
        return f"experts [{self.first}, {self.first + self.num_local}) of {self.num_experts}, ep={self.ep_size}"


def apply_expert_parallel(model: Transformer, group: dist.ProcessGroup) -> Transformer:
    """Replace every MoE layer's `mlp.experts` by this rank's block of E/ep experts (weights copied from the full
    ones, so load or initialise the full model first). State-dict keys keep their names; shapes become local."""
    for moe in model.moe_layers():
        if isinstance(moe.experts, ExpertParallelExperts):
            raise UserValueError("apply_expert_parallel: the model's experts are already distributed")
        moe.experts = ExpertParallelExperts(moe.experts, group)
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters held by ExpertParallelExperts modules (sharded over the EP group)."""
    return [p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()]


def gather_full_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The single-device state dict, with every expert-parallel weight all-gathered over its EP group.

    Collective: every rank must call it. Tensors are detached and on the model's device.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor.detach()
    for mname, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for pname, param in module.named_parameters():
                state[f"{mname}.{pname}"] = gather_blocks(param.detach(), module)
    return state


def gather_blocks(local: torch.Tensor, module: ExpertParallelExperts) -> torch.Tensor:
    """Concatenate every EP rank's block (dim 0) of a per-expert tensor; blocks may differ by one expert, so
    they travel padded to the largest. Collective over the module's EP group."""
    most = max(module.sizes)
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(module.ep_size)]
    dist.all_gather(parts, padded, group=module.group)
    return torch.cat([part[:n] for part, n in zip(parts, module.sizes)])


def full_model(model: Transformer) -> Transformer:
    """A plain single-device Transformer holding the gathered full weights (shares the replicated tensors).
    Collective; every rank gets one, rank 0 writes it."""
    state = gather_full_state(model)
    with torch.device("meta"):
        full = Transformer(model.config)
    full.load_state_dict(state, assign=True)
    return full


def with_ep_device_groups(config: ModelConfig, ep: int) -> ModelConfig:
    """With ep > 1 and n_device_groups left at 1, the device-level balance loss uses the EP ranks as its devices
    (as the paper does for 145B); only when ep divides the routed experts, since the loss needs equal groups.
    Applied to the run's config, so checkpoints and resumes at any world size see the same loss."""
    e = config.n_routed_experts
    if ep > 1 and config.n_device_groups == 1 and e and e % ep == 0:
        return config.replace(n_device_groups=ep)
    return config
