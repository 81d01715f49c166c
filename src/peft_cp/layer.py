"""The adapted linear layer: base output plus the CP update read from the factor store."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .functional import add_cp_update_, merged_cp_linear, merged_weight
from .store import AuroraFactorStore


class AuroraLayer(BaseTunerLayer):
    """Per-layer state of Aurora: which rows of P the layer's matrices use, and its dropout.

    The factors themselves live in one `AuroraFactorStore` per adapter, owned by the tuner model;
    a layer keeps only a reference to it (not a submodule), so the factors are stored and saved
    once however many layers read them.
    """

    adapter_layer_names: tuple[str, ...] = ("aurora_dropout",)
    other_param_names: tuple[str, ...] = ("aurora_rows", "aurora_scale", "aurora_stores")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.aurora_dropout = nn.ModuleDict({})
        self.aurora_rows: dict[str, slice] = {}
        self.aurora_scale: dict[str, float] = {}
        self.aurora_stores: dict[str, AuroraFactorStore] = {}

        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def update_layer(
        self,
        adapter_name: str,
        store: AuroraFactorStore,
        rows: slice,
        scale: float,
        dropout: float,
        inference_mode: bool = False,
    ) -> None:
        num_slices = rows.stop - rows.start
        assert self.out_features % num_slices == 0, "validated when the rows were planned"

        self.aurora_stores[adapter_name] = store
        self.aurora_rows[adapter_name] = rows
        self.aurora_scale[adapter_name] = scale
        self.aurora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _slice_shape(self, adapter_name: str) -> tuple[int, int]:
        rows = self.aurora_rows[adapter_name]
        return self.out_features // (rows.stop - rows.start), self.in_features

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """dW of this layer, (out_features, in_features): its slices' updates stacked by rows."""
        store = self.aurora_stores[adapter_name]
        d_out, d_in = self._slice_shape(adapter_name)
        return store.delta_weight(
            self.aurora_rows[adapter_name], d_out, d_in, self.aurora_scale[adapter_name]
        )


class Linear(nn.Module, AuroraLayer):
    """`nn.Linear` plus the Aurora update: y = x W^T + b + x dW^T, dW = U diag(lam * P[k]) V^T.

    A fused projection (BLIP's vision `qkv`) is S matrices stacked by rows; slice s uses row
    `rows.start + s` of P, and the S updates are applied by one matmul.

    When the adapter's store has `fast_path` on (the default), x V comes from the store's
    per-input cache (shared with the other layers reading the same tensor; not when an active
    dropout gives this layer its own input) and (x V) up^T is accumulated into the base output in
    place, as one autograd node per adapter (`peft_cp.functional.add_cp_update_`). A layer
    whose input has at least twice as many tokens as features runs on its weight plus the update
    instead, materialised for the call (`peft_cp.functional.merged_cp_linear`), which is then
    cheaper; see `merge_when_cheaper` of the store. With `fast_path` off, every layer computes the
    plain reference expression; all paths give the same values and gradients.
    """

    merge_tokens_per_feature = 2

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        store: AuroraFactorStore,
        rows: slice,
        scale: float = 1.0,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        AuroraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, store, rows, scale, dropout)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the updates of the given (default: active) adapters into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_weight = self.get_base_layer().weight

        for name in adapter_names:
            if name not in self.aurora_stores:
                continue
            delta = self.get_delta_weight(name).to(base_weight.dtype)
            if safe_merge:
                merged = base_weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter {name!r} produced non-finite weights.")
                base_weight.data = merged
            else:
                base_weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged updates from the base weight, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.aurora_stores:
                base_weight.data -= self.get_delta_weight(name).to(base_weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        stores = {
            name: self.aurora_stores[name]
            for name in self.active_adapters
            if name in self.aurora_stores
        }
        if not all(store.fast_path for store in stores.values()):
            return self._reference_forward(x, stores, *args, **kwargs)
        if not args and not kwargs and self._merging_is_cheaper(x, stores):
            return self._merged_forward(x, stores)

        # The base layer sees the input flattened to (T, in_features), so that its output is a
        # fresh 2-D tensor and not a view: adding into a view in place would make autograd route
        # the output gradient through CopySlices and AsStrided backward, which copy and zero-fill
        # the whole (T, out_features) gradient of every adapted layer.
        result = self.base_layer(x.reshape(-1, self.in_features), *args, **kwargs)  # (T, S*d_out)
        for name, store in stores.items():
            d_out, d_in = self._slice_shape(name)
            hidden = self._fast_down_projection(name, x, d_in)  # (..., R), shared with others
            # The S slices' up-projections are applied by one matmul.
            result = add_cp_update_(
                result,
                hidden.reshape(-1, store.rank),
                store.U(d_out),
                store.coefficients(self.aurora_rows[name]),  # (S, R)
                self.aurora_scale[name],
            )
        return result.view(*x.shape[:-1], self.out_features)

    def _merging_is_cheaper(self, x: torch.Tensor, stores: dict[str, AuroraFactorStore]) -> bool:
        """Whether this call runs on W + dW, materialised for it, instead of per token.

        Per token the update costs S*d_out*R multiply-adds (plus d_in*R for x V, which training
        needs either way), materialising it S*d_out*d_in*R plus two passes over a weight-sized
        tensor. Arithmetic alone favours materialising from d_in tokens on; measured (BLIP's
        qkv, rank 128, 2-core CPU), both cost the same at d_in tokens and materialising is 15 %
        faster at 4 d_in, so it is chosen from `merge_tokens_per_feature` * d_in tokens on (a
        vision encoder's patch tokens or cross-attention over the image tokens of a large
        batch). Only for a plain `nn.Linear` base that is frozen and that nothing hooks into (an
        Accelerate offloading hook brings its weight in only when it runs), with no active
        dropout and when the store allows it (`merge_when_cheaper`); under autograd, for one
        adapter.
        """
        base = self.get_base_layer()
        hooked = base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook")
        if type(base) is not nn.Linear or hooked:
            return False
        if torch.is_grad_enabled():
            frozen = not any(p is not None and p.requires_grad for p in (base.weight, base.bias))
            if not frozen or len(stores) != 1:
                return False
        for name, store in stores.items():
            dropout = self.aurora_dropout[name]
            if not store.merge_when_cheaper or (
                isinstance(dropout, nn.Dropout) and dropout.training
            ):
                return False
        tokens = x.numel() // self.in_features
        return tokens >= self.merge_tokens_per_feature * self.in_features

    def _merged_forward(
        self, x: torch.Tensor, stores: dict[str, AuroraFactorStore]
    ) -> torch.Tensor:
        base = self.get_base_layer()
        if not torch.is_grad_enabled():
            weight = base.weight
            for name, store in stores.items():
                d_out, d_in = self._slice_shape(name)
                coefficients = store.coefficients(self.aurora_rows[name])
                scale = self.aurora_scale[name]
                weight = merged_weight(weight, store.U(d_out), coefficients, store.V(d_in), scale)
            return F.linear(x, weight, base.bias)

        ((name, store),) = stores.items()
        d_out, d_in = self._slice_shape(name)
        hidden = self._fast_down_projection(name, x, d_in)  # x V, needed by the backward
        result = merged_cp_linear(
            x.reshape(-1, self.in_features),
            base.weight,
            base.bias,
            hidden.reshape(-1, store.rank),
            store.U(d_out),
            store.coefficients(self.aurora_rows[name]),
            store.V(d_in),
            self.aurora_scale[name],
        )
        return result.view(*x.shape[:-1], self.out_features)

    def _reference_forward(
        self, x: torch.Tensor, stores: dict[str, AuroraFactorStore], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The plain expression base(x) + sum over adapters of (dropout(x) V) up^T."""
        result = self.base_layer(x, *args, **kwargs)
        for name, store in stores.items():
            d_out, d_in = self._slice_shape(name)
            up = store.up_weight(self.aurora_rows[name], d_out, self.aurora_scale[name])
            x_in = self._cast_input_dtype(self.aurora_dropout[name](x), store.P.dtype)
            hidden = x_in @ store.V(d_in)  # (..., R)
            result = result + (hidden @ up.T).to(result.dtype)  # (..., S*d_out)
        return result

    def _fast_down_projection(self, name: str, x: torch.Tensor, d_in: int) -> torch.Tensor:
        store = self.aurora_stores[name]
        dropout = self.aurora_dropout[name]
        if isinstance(dropout, nn.Dropout) and dropout.training:
            # Each layer draws its own mask, exactly as in the reference path, so x V of the
            # dropped input is this layer's alone and is not shared.
            x_in = self._cast_input_dtype(dropout(x), store.P.dtype)
            return store.down_project(x_in, d_in, reuse=False)
        if not getattr(self, "cast_input_dtype_enabled", True):
            return x @ store.V(d_in)  # the reference path does not cast either
        return store.down_project(x, d_in)

    def __repr__(self) -> str:
        return "aurora." + super().__repr__()
