"""The factor store: the CP factors U, V, P and lam of one Aurora adapter."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from .functional import stacked_up


class AuroraFactorStore(nn.Module):
    """Holds the CP factors of one adapter and builds each matrix's update from them.

    The update of adapted matrix k is dW_k = U diag(lam * P[k]) V^T, a slice of the rank-R CP
    tensor sum_r lam_r u_r (outer) v_r (outer) p_r (Wang et al., NeurIPS 2023). U is kept per output
    size and V per input size (`U_768`, `V_768`, ...), so matrices of different shapes can share
    one adapter; P (N x R) has one row per adapted matrix and lam (R) is shared by all.

    Initialisation: U ~ N(0, 1/R), P ~ N(0, 1), lam = 1 and V = 0, so every update is zero at
    step 0 while the gradient of V is not. With `init_weights=False`, V ~ N(0, 1/d_in) as well
    (a non-identity adapter, for tests).

    Fast path: `down_project` computes x V once per input tensor, however many adapted matrices
    read that input (BLIP's text query, key and value read one `hidden_states`; cross-attention
    keys and values read one image-token tensor), so their forward matmul, the gradient of V and
    the input gradient through V are each computed once. A layer whose input has at least twice
    as many tokens as features computes its forward on a temporary copy of its weight plus its
    update instead (`merge_when_cheaper`; the base weight itself is never touched; the backward is
    the same). Set `fast_path = False` to run every layer through the plain reference computation.

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

        self.fast_path = True
        self.merge_when_cheaper = True
        self._down_cache = _DownProjectionCache()

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
        return stacked_up(self.U(d_out), self.coefficients(rows), scale)

    def delta_weight(self, rows: slice, d_out: int, d_in: int, scale: float = 1.0) -> torch.Tensor:
        """The updates of the selected matrices, stacked along the output dim: (S*d_out, d_in)."""
        return self.up_weight(rows, d_out, scale) @ self.V(d_in).T

    def down_project(self, x: torch.Tensor, d_in: int, reuse: bool = True) -> torch.Tensor:
        """x V_{d_in}: (..., d_in) -> (..., R), in the factors' dtype.

        With `reuse`, the result for the tensor most recently projected onto V_{d_in} is returned
        again when the same tensor object comes back unchanged (same in-place version, same V
        version, same grad mode), so that layers reading one input share one matmul and one
        autograd node; their gradients with respect to x V add up before flowing into x and V.
        Pass `reuse=False` when x is not the layer input itself (e.g. after an active dropout).
        """
        weight = self.V(d_in)
        if not reuse:
            return x.to(weight.dtype) @ weight

        hidden = self._down_cache.lookup(x, weight)
        if hidden is None:
            hidden = x.to(weight.dtype) @ weight
            self._down_cache.remember(x, weight, hidden)
        return hidden

    def clear_cache(self) -> None:
        """Forget the remembered down-projections (they are also dropped on their own)."""
        self._down_cache.clear()

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, num_rows={self.num_rows}, out_dims={self.out_dims}, "
            f"in_dims={self.in_dims}"
        )


class _DownProjectionCache:
    """Remembers the last few x V computed per input width, and the input tensors they came from.

    A few entries per width suffice because the layers that share an input run close together,
    except for the image tokens, which every cross-attention layer of the text encoder reads:
    entries are evicted least recently used first, so the image tokens, read once per layer, stay
    among the `capacity` entries and are projected once for all layers.
    An entry never outlives its usefulness: it is keyed on the input *object* (a weak reference,
    so a new tensor that reuses a freed buffer never matches), on its in-place version and on V's
    (an optimizer step bumps it) and on the backward pass it was made in, if any (activation
    checkpointing recomputes forwards there), and it is dropped as soon as backward reaches x V
    or the input tensor is freed. A forward in grad mode that is never followed by backward
    leaves its last `capacity` entries per width (and the graph they reach) until newer inputs
    displace them or `AuroraFactorStore.clear_cache` is called. Deep copies and pickles start empty.
    """

    capacity = 3

    def __init__(self) -> None:
        # d_in -> most recent last: (weak reference to x, key, x V, token naming the entry)
        self._entries: dict[int, list[tuple[weakref.ref, tuple, torch.Tensor, object]]] = {}

    @staticmethod
    def _key(x: torch.Tensor, weight: torch.Tensor) -> tuple | None:
        # Inference tensors have no version counter; they are not shared rather than risk a stale
        # entry after an in-place update.
        if x.is_inference() or weight.is_inference():
            return None
        return (
            x._version,
            weight._version,
            weight.data_ptr(),
            weight.dtype,
            torch.is_grad_enabled(),
            torch.is_autocast_enabled(x.device.type),
            # -1 outside backward. An activation-checkpointed forward that is recomputed during
            # backward then never reuses the x V of the original forward, which would change
            # what the recomputation saves (non-reentrant checkpointing refuses that).
            _current_graph_task(),
        )

    def lookup(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        entries = self._entries.get(weight.shape[0], [])
        for index, entry in enumerate(entries):
            source, key, hidden, _ = entry
            if source() is x:
                if key != self._key(x, weight):
                    return None
                # Most recently used last: the image tokens, read by every cross-attention layer,
                # then outlive the per-layer inputs that come and go between their reads.
                entries.append(entries.pop(index))
                return hidden
        return None

    def remember(self, x: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor) -> None:
        d_in = weight.shape[0]
        entries = self._entries.setdefault(d_in, [])
        # A stale entry of the same tensor (changed in place, or V stepped) is replaced.
        entries[:] = [entry for entry in entries if entry[0]() is not x]
        key = self._key(x, weight)
        if key is None:
            return

        # The callbacks hold the cache weakly and name their entry by a token, so neither keeps
        # anything alive nor drops another entry.
        token = object()
        cache = weakref.ref(self)

        def forget(_: object) -> None:
            owner = cache()
            if owner is not None:
                owner._forget(d_in, token)

        entries.append((weakref.ref(x, forget), key, hidden, token))
        del entries[: -self.capacity]
        if hidden.requires_grad:
            # Once backward reaches x V, every layer that reads it has contributed its gradient.
            hidden.register_hook(forget)

    def _forget(self, d_in: int, token: object) -> None:
        entries = self._entries.get(d_in, [])
        entries[:] = [entry for entry in entries if entry[3] is not token]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def __deepcopy__(self, memo: dict) -> _DownProjectionCache:
        return _DownProjectionCache()

    def __getstate__(self) -> dict:
        return {"_entries": {}}


def _current_graph_task() -> int:
    """The id of the backward pass running in this thread, -1 outside one."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if current is None else current()
