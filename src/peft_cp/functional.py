"""Autograd pieces of Aurora's fast path: the up-projection accumulated into the base output.

The reference computation of an adapted layer is ``y = x W^T + b + (x V) up^T`` with
``up = [U diag(c_1); ...; U diag(c_S)] * scale`` (S*d_out x R). Written with plain tensor ops it
allocates ``(x V) up^T`` and then a second output of the same size for the sum, and autograd keeps
both graphs apart. `add_low_rank_` instead adds ``hidden up^T`` into the buffer the base matmul
just returned, inside the GEMM (beta = 1), and saves only ``hidden`` (..., R) and ``up`` for
backward, which is all the gradients need:

    dL/d hidden = g up            (..., R)
    dL/d up     = g^T hidden      (S*d_out, R), summed over all leading dims
    dL/d result = g               (the base output's own gradient passes through unchanged)
"""

from __future__ import annotations

import torch


class _AddLowRankInPlace(torch.autograd.Function):
    """result += hidden @ up^T in place; result (..., n), hidden (..., R), up (n, R)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        result: torch.Tensor,
        hidden: torch.Tensor,
        up: torch.Tensor,
    ) -> torch.Tensor:
        rank = hidden.shape[-1]
        if result.dtype == hidden.dtype and result.is_contiguous():
            result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, rank), up.t())
        else:
            # A low-precision base under fp32 factors: the update is computed in the factors'
            # dtype and rounded once, exactly as the reference path does.
            result.add_((hidden @ up.t()).to(result.dtype))

        ctx.mark_dirty(result)
        ctx.save_for_backward(hidden, up)
        return result

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        hidden, up = ctx.saved_tensors
        grad_factor = grad.to(up.dtype)
        grad_hidden = grad_up = None

        if ctx.needs_input_grad[1]:
            grad_hidden = grad_factor @ up  # (..., R)
        if ctx.needs_input_grad[2]:
            rank = hidden.shape[-1]
            grad_2d = grad_factor.reshape(-1, grad_factor.shape[-1])  # (T, n)
            grad_up = grad_2d.t() @ hidden.reshape(-1, rank)  # (n, R)

        grad_result = grad if ctx.needs_input_grad[0] else None
        return grad_result, grad_hidden, grad_up


def add_low_rank_(result: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Add ``hidden @ up^T`` into `result` in place and return it (autograd-aware).

    Args:
        result: (..., n), a fresh output that nothing else has saved for backward (the base
            layer's output: a linear layer saves its input, not its output).
        hidden: (..., R), the input's down-projection x V.
        up: (n, R), the stacked up-projections.

    Returns:
        `result`, now (..., n) = result + hidden @ up^T.
    """
    return _AddLowRankInPlace.apply(result, hidden, up)
