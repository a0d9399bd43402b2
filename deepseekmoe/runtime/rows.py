"""Row-wise work of a training step cut into row blocks that the CPU runtime's workers take as they finish one.

The LM cross-entropy over (tokens x vocabulary) logits is the largest piece of a small model's step that is not a
matmul (tiny: 2,048 x 8,192 logits, a fifth of the step in the calling thread): its log-softmax, the gradient of
the negative log-likelihood (a zero tensor the size of the logits, with one entry a row set) and the log-softmax's
backward are all row by row, so each row block runs the same kernels on its rows as one call over all rows would
and the result has the same bits whoever ran which block (tests/test_runtime_threads.py checks them against
F.cross_entropy). Only the mean, one sum over rows, runs once over the whole, in the calling thread:

    forward   logp[rows] = log_softmax(logits[rows]);  loss = nll_loss(logp, targets)
    backward  d_logits[rows] = log_softmax_backward(nll_loss_backward(d_loss, logp[rows], targets[rows]), logp[rows])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import Runner, split_rows

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
