"""Row-wise work of a training step cut into row blocks that the CPU runtime's workers take as they finish one.

The LM cross-entropy over (tokens x vocabulary) logits is the largest piece of a small model's step that is not a
matmul (tiny: 2,048 x 8,192 logits, a fifth of the step in the calling thread): its log-softmax, the gradient of
the negative log-likelihood (a zero tensor the size of the logits, with one entry a row set) and the log-softmax's
backward are all row by row, so each row block runs the same kernels on its rows as one call over all rows would
and the result has the same bits whoever ran which block (tests/test_runtime_threads.py checks them against
F.cross_entropy). Only the mean, one sum over rows, runs once over the whole, in the calling thread:

    forward   logp[rows] = log_softmax(logits[rows]);  loss = nll_loss(logp, targets)
    backward  d_logits[rows] = log_softmax_backward(nll_loss_backward(d_loss, logp[rows], targets[rows]), logp[rows])

Causal self-attention over whole sequences is computed per (sequence, head) by the CPU flash kernel, so blocks of
sequences (or of heads) run it the same way (`WorkerAttention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.attention import Attention
from .linear import PARTS_PER_WORKER, Runner, blocks, split_rows

MIN_LOSS_ELEMENTS = 1 << 20
"""Logits (rows x vocabulary) from which the cross-entropy runs in row blocks; smaller ones run F.cross_entropy."""
_MEAN = 1  # at::Reduction::Mean


def cross_entropy(runtime: Runner, logits_NV: torch.Tensor, targets_N: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(logits, targets, ignore_index=...) (the mean over rows whose target is not ignored), with
    the row-wise work in row blocks on the workers for fp32 CPU logits of at least MIN_LOSS_ELEMENTS."""
    if (logits_NV.device.type != "cpu" or logits_NV.dtype != torch.float32 or logits_NV.dim() != 2
            or logits_NV.numel() < MIN_LOSS_ELEMENTS or runtime.in_worker()):
        return F.cross_entropy(logits_NV, targets_N, ignore_index=ignore_index)
    return _SplitCrossEntropy.apply(logits_NV.contiguous(), targets_N.contiguous(), ignore_index, runtime)


class _SplitCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, targets_N, ignore_index, runtime):  # type: ignore[override]
        logp_NV = torch.empty_like(logits_NV)
        split_rows(runtime, logits_NV.shape[0],
                    lambda a, b: torch._log_softmax(logits_NV[a:b], 1, False, out=logp_NV[a:b]))
        loss, total_weight = torch.ops.aten.nll_loss_forward(logp_NV, targets_N, None, _MEAN, ignore_index)
        ctx.save_for_backward(logp_NV, targets_N, total_weight)
        ctx.ignore_index, ctx.runtime = ignore_index, runtime
        return loss

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        logp_NV, targets_N, total_weight = ctx.saved_tensors
        d_logits = torch.empty_like(logp_NV)

        def part(a: int, b: int) -> None:
            d_logp = torch.ops.aten.nll_loss_backward(grad, logp_NV[a:b], targets_N[a:b], None, _MEAN,
                                                      ctx.ignore_index, total_weight)
            torch.ops.aten._log_softmax_backward_data.out(d_logp, logp_NV[a:b], 1, torch.float32,
                                                          out=d_logits[a:b])
        split_rows(ctx.runtime, logp_NV.shape[0], part)
        return d_logits, None, None, None


MIN_ATTENTION_WORK = 1 << 26
"""Causal self-attention of at least this many multiply-adds (B x H x S^2 x hd) runs in blocks on the workers."""
_FLASH = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)


class WorkerAttention(Attention):
    """Attention whose causal self-attention over whole fp32 sequences (training, prefill without a cache) runs
    CPU flash attention, the kernel F.scaled_dot_product_attention picks there, on blocks of sequences (or of
    heads for one sequence) on the workers: every (sequence, head) is computed on its own by that kernel, forward
    and backward, so the bits are those of one call over the whole (tests/test_runtime_threads.py)."""

    runtime: Runner

    def attend(self, q, k, v, start_pos, key_mask):  # type: ignore[override]
        dim = 0 if q.shape[0] > 1 else 1
        if (isinstance(start_pos, torch.Tensor) or key_mask is not None or q.shape[2] != k.shape[2]
                or q.shape[1] != k.shape[1] or q.device.type != "cpu" or q.dtype != torch.float32
                or q.shape[dim] < 2 or q.shape[0] * q.shape[1] * q.shape[2] ** 2 * q.shape[3] < MIN_ATTENTION_WORK
                or self.runtime.in_worker() or torch._fused_sdp_choice(q, k, v, None, 0.0, True) != _FLASH):
            return super().attend(q, k, v, start_pos, key_mask)
        return _SplitAttention.apply(q, k, v, dim, self.runtime)


def _like_flash(q: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, S, hd) tensor laid out as the flash kernel lays out its output: (B, S, H, hd) in memory."""
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dim, runtime):  # type: ignore[override]
        out = _like_flash(q)
        parts = blocks(q.shape[dim], runtime.workers * PARTS_PER_WORKER)
        lse: list[torch.Tensor | None] = [None] * len(parts)

        def part(i: int, a: int, b: int) -> None:
            o, lse[i] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.narrow(dim, a, b - a), k.narrow(dim, a, b - a), v.narrow(dim, a, b - a), 0.0, True)
            out.narrow(dim, a, b - a).copy_(o)
        runtime.run_parts([lambda i=i, a=a, b=b: part(i, a, b) for i, (a, b) in enumerate(parts)])
        ctx.save_for_backward(q, k, v, out, *lse)
        ctx.dim, ctx.parts, ctx.runtime = dim, parts, runtime
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v, out, *lse = ctx.saved_tensors
        dim = ctx.dim
        grads = _like_flash(q), _like_flash(k), _like_flash(v)

        def part(i: int, a: int, b: int) -> None:
            rows = [t.narrow(dim, a, b - a) for t in (grad, q, k, v, out)]
            for d, g in zip(grads, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    *rows, lse[i], 0.0, True)):
                d.narrow(dim, a, b - a).copy_(g)
        ctx.runtime.run_parts([lambda i=i, a=a, b=b: part(i, a, b) for i, (a, b) in enumerate(ctx.parts)])
        return *grads, None, None
