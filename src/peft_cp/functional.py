"""Autograd pieces of Aurora's fast path: the CP update of one adapted linear layer.

An adapted layer of S stacked slices (S = 3 for a fused qkv) adds, for slice s,
``scale * h diag(c_s) U^T`` with ``h = x V`` and ``c_s = lam * P[k_s]``. Written with plain
tensor ops, the reference computation builds ``up = [U diag(c_1); ...; U diag(c_S)]``
(S*d_out x R) through a chain of broadcasts whose backward is as many reductions, then allocates
``h up^T`` and a second output of the same size for the sum. Here each layer's update is one
autograd node that saves only h (T x R), U and the coefficients (S x R), in one of two forms:

- `add_cp_update_` adds ``h up^T`` into the buffer the base matmul just returned, inside the GEMM
  (beta = 1): S*d_out*R multiply-adds per token.
- `merged_cp_linear` runs the layer on ``W + up V^T``, materialised for the call and not kept:
  S*d_out*d_in*R multiply-adds whatever the number of tokens, fewer from d_in tokens on (layers
  choose it from twice that; see `peft_cp.layer.Linear`).

Both have the same backward, computed token by token; with g_s the output gradient of slice s:

    dL/d h      = scale * sum_s (g_s U) diag(c_s)    (T, R)
    dL/d U      = scale * sum_s g_s^T h diag(c_s)    (d_out, R)
    dL/d c_s    = scale * sum_t (g_s U)[t] * h[t]    (S, R)
    dL/d x      = g W                                (the base layer's part; h's own gradient
                                                      reaches x through the node that made h)
"""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812


class _AddCPUpdateInPlace(torch.autograd.Function):
    """result += sum_s (hidden diag(c_s)) U^T into slice block s; result (T, S*d_out)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        result: torch.Tensor,
        hidden: torch.Tensor,
        u: torch.Tensor,
        coefficients: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        d_out, rank = u.shape
        # Row t*S + s of the (T*S, d_out) view of result is slice s of token t.
        scaled_hidden = _per_slice(hidden, coefficients, scale).view(-1, rank)  # (T*S, R)
        if result.dtype == scaled_hidden.dtype == u.dtype and result.is_contiguous():
            result.view(-1, d_out).addmm_(scaled_hidden, u.t())
        else:
            # A low-precision base under fp32 factors, or autocast (which leaves in-place ops
            # alone): the update is computed as the reference path computes it, in the factors'
            # dtype or autocast's, and rounded once.
            update = (scaled_hidden @ u.t()).view(result.shape)
            result.add_(update.to(result.dtype))

        ctx.mark_dirty(result)
        ctx.save_for_backward(hidden, u, coefficients)
        ctx.scale = scale
        return result

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, u, coefficients = ctx.saved_tensors
        factor_grads = _factor_grads(ctx, grad, hidden, u, coefficients, first_input=1)
        grad_result = grad if ctx.needs_input_grad[0] else None
        return grad_result, *factor_grads, None


class _MergedCPLinear(torch.autograd.Function):
    """F.linear(x, merged, bias) with merged = W + up V^T; gradients as the per-token update."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        merged: torch.Tensor,
        bias: torch.Tensor | None,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        u: torch.Tensor,
        coefficients: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, hidden, u, coefficients)
        ctx.scale = scale
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        weight, hidden, u, coefficients = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        factor_grads = _factor_grads(ctx, grad, hidden, u, coefficients, first_input=4)
        return grad_x, None, None, None, *factor_grads, None


def _factor_grads(
    ctx: torch.autograd.function.FunctionCtx,
    grad: torch.Tensor,
    hidden: torch.Tensor,
    u: torch.Tensor,
    coefficients: torch.Tensor,
    first_input: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of hidden, U and the coefficients, the inputs `first_input` to + 2 of ctx."""
    needs_hidden, needs_u, needs_coefficients = ctx.needs_input_grad[first_input : first_input + 3]
    num_slices, (d_out, rank) = coefficients.shape[0], u.shape
    # (T*S, d_out): row t*S + s is the gradient of slice s of token t
    grad_rows = grad.to(u.dtype).reshape(-1, d_out)
    grad_hidden = grad_u = grad_coefficients = None

    if needs_hidden or needs_coefficients:
        grad_scaled = (grad_rows @ u).view(-1, num_slices, rank)  # (T, S, R): g_s U
        if needs_hidden:
            grad_hidden = grad_scaled * _scaled(coefficients, ctx.scale)
            grad_hidden = grad_hidden.sum(1) if num_slices > 1 else grad_hidden.view(-1, rank)
        if needs_coefficients:
            grad_coefficients = _scaled((grad_scaled * hidden.unsqueeze(1)).sum(0), ctx.scale)
    if needs_u:
        scaled_hidden = _per_slice(hidden, coefficients, ctx.scale).view(-1, rank)
        grad_u = grad_rows.t() @ scaled_hidden  # sum over tokens and slices
    return grad_hidden, grad_u, grad_coefficients


def _per_slice(hidden: torch.Tensor, coefficients: torch.Tensor, scale: float) -> torch.Tensor:
    """hidden diag(scale c_s) for every slice s: (T, S, R) from hidden (T, R), c (S, R)."""
    return hidden.unsqueeze(1) * _scaled(coefficients, scale)


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    # Skips an elementwise pass per layer call at the default scale of 1.
    return tensor if scale == 1.0 else tensor * scale


def stacked_up(u: torch.Tensor, coefficients: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[U diag(scale c_1); ...; U diag(scale c_S)]: (S*d_out, R) from U (d_out, R), c (S, R)."""
    return (u.unsqueeze(0) * _scaled(coefficients, scale).unsqueeze(1)).reshape(-1, u.shape[1])


@torch.no_grad()
def merged_weight(
    weight: torch.Tensor, u: torch.Tensor, coefficients: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """W + [U diag(scale c_1); ...; U diag(scale c_S)] V^T as a new tensor, outside autograd."""
    delta_factor = stacked_up(u, coefficients, scale)  # (S*d_out, R)
    if delta_factor.dtype == weight.dtype:
        return torch.addmm(weight, delta_factor, v.t())
    return weight + (delta_factor @ v.t()).to(weight.dtype)


def add_cp_update_(
    result: torch.Tensor,
    hidden: torch.Tensor,
    u: torch.Tensor,
    coefficients: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Add the CP update of S stacked slices into `result` in place and return it.

    Autograd-aware: gradients flow to `result`'s producer, `hidden`, `u` and `coefficients`.

    Args:
        result: (T, S*d_out), a fresh 2-D output that nothing else has saved for backward (the
            base layer's output: a linear layer saves its input, not its output).
        hidden: (T, R), the input's down-projection x V.
        u: (d_out, R), the output factor U.
        coefficients: (S, R), lam * P[k_s] of each slice.
        scale: Constant multiplying every update.

    Returns:
        `result`, now result + hidden @ [U diag(scale c_1); ...; U diag(scale c_S)]^T.
    """
    return _AddCPUpdateInPlace.apply(result, hidden, u, coefficients, scale)


def merged_cp_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    u: torch.Tensor,
    coefficients: torch.Tensor,
    v: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """x (W + dW)^T + bias with the update dW materialised for this call only.

    The same values as ``F.linear(x, weight, bias)`` followed by `add_cp_update_`, for
    S*d_out*d_in*R multiply-adds instead of S*d_out*R per token. Gradients flow to x through the
    frozen `weight` (which, like `bias`, must not require a gradient), and to `hidden`, `u` and
    `coefficients` exactly as from `add_cp_update_`; V's gradient and the rest of x's arrive
    through `hidden`, which must be x V.

    Args:
        x: (T, d_in).
        weight, bias: The frozen base layer's, (S*d_out, d_in) and (S*d_out,).
        hidden: (T, R), x V.
        u, coefficients, scale: As for `add_cp_update_`.
        v: (d_in, R), the input factor V (read for the forward only).

    Returns:
        (T, S*d_out).
    """
    merged = merged_weight(weight, u, coefficients, v, scale)
    return _MergedCPLinear.apply(x, merged, bias, weight, hidden, u, coefficients, scale)
