"""The factor store: the CP factors U, V, P and lam of one Aurora adapter."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class AuroraFactorStore(nn.Module):
    """Holds the CP factors of one adapter and builds each matrix's update from them.

    The update of adapted matrix k is dW_k = U diag(lam * P[k]) V^T, a slice of the rank-R CP
    tensor sum_r lam_r u_r (outer) v_r (outer) p_r (Wang et al., NeurIPS 2023). U is kept per output
    size and V per input size (`U_768`, `V_768`, ...), so matrices of different shapes can share
    one adapter; P (N x R) has one row per adapted matrix and lam (R) is shared by all.

    Initialisation: U ~ N(0, 1/R), P ~ N(0, 1), lam = 1 and V = 0, so every update is zero at
    step 0 while the gradient of V is not. With `init_weights=False`, V ~ N(0, 1/d_in) as well
    (a non-identity adapter, for tests).

    Args:
        rank: Number R of CP components.
        num_rows: Number N of adapted matrices (rows of P).
        out_dims: Output sizes of the adapted matrices (one U per size).
        in_dims: Input sizes of the adapted matrices (one V per size).
        init_weights: Whether V starts at zero.
        dtype, device: Of the factors.
    """

    def __init__(
        self,
        rank: int,
        num_rows: int,
        out_dims: Iterable[int],
        in_dims: Iterable[int],
        init_weights: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.num_rows = num_rows
        self.out_dims = tuple(sorted(set(out_dims)))
        self.in_dims = tuple(sorted(set(in_dims)))

        factory = {"dtype": dtype, "device": device}
        for d_out in self.out_dims:
            self.register_parameter(f"U_{d_out}", nn.Parameter(torch.empty(d_out, rank, **factory)))
        for d_in in self.in_dims:
            self.register_parameter(f"V_{d_in}", nn.Parameter(torch.empty(d_in, rank, **factory)))
        self.P = nn.Parameter(torch.empty(num_rows, rank, **factory))
        self.lam = nn.Parameter(torch.empty(rank, **factory))

        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: bool = True) -> None:
        if self.P.is_meta:
            return
        for d_out in self.out_dims:
            self.U(d_out).normal_(0.0, 1.0 / math.sqrt(self.rank))
        for d_in in self.in_dims:
            if init_weights:
                self.V(d_in).zero_()
            else:
                self.V(d_in).normal_(0.0, 1.0 / math.sqrt(d_in))
        self.P.normal_(0.0, 1.0)
        self.lam.fill_(1.0)

    def U(self, d_out: int) -> nn.Parameter:  # noqa: N802 (the method's name for the factor)
        """The output factor (d_out x R) shared by matrices with `d_out` rows."""
        return getattr(self, f"U_{d_out}")

    def V(self, d_in: int) -> nn.Parameter:  # noqa: N802
        """The input factor (d_in x R) shared by matrices with `d_in` columns."""
        return getattr(self, f"V_{d_in}")

    def coefficients(self, rows: slice) -> torch.Tensor:
        """lam * P[rows]: the diagonal of each selected matrix's core, shape (S, R)."""
        return self.lam * self.P[rows]

    def up_weight(self, rows: slice, d_out: int, scale: float = 1.0) -> torch.Tensor:
        """The stacked up-projections [U diag(c_1); ...; U diag(c_S)] * scale, shape (S*d_out, R).

        Multiplying x V (..., R) by its transpose gives the outputs of all S slices at once.
        """
        coefficients = self.coefficients(rows) * scale  # (S, R)
        stacked = self.U(d_out).unsqueeze(0) * coefficients.unsqueeze(1)  # (S, d_out, R)
        return stacked.reshape(-1, self.rank)

    def delta_weight(self, rows: slice, d_out: int, d_in: int, scale: float = 1.0) -> torch.Tensor:
        """The updates of the selected matrices, stacked along the output dim: (S*d_out, d_in)."""
        return self.up_weight(rows, d_out, scale) @ self.V(d_in).T

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, num_rows={self.num_rows}, out_dims={self.out_dims}, "
            f"in_dims={self.in_dims}"
        )
