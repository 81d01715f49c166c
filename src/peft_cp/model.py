"""The Aurora tuner: finds the targets, assigns their rows of P and owns the factor store."""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.integrations import init_empty_weights
from torch import nn

from .config import (
    DEFAULT_FUSED_SLICES,
    DEFAULT_ROW_SHARING,
    DEFAULT_TARGET_MODULES,
    AuroraConfig,
)
from .layer import AuroraLayer, Linear
from .store import AuroraFactorStore

logger = logging.getLogger(__name__)

STORE_KEY = "base_model.aurora_store"


@dataclass
class RowPlan:
    """Which rows of P each adapted module uses, and the matrix shapes the store must serve.

    Attributes:
        rows: Module name -> rows of P, one per slice (contiguous).
        shared: Module name -> name of the module whose rows it reuses.
        num_rows: N, the number of rows of P.
        out_dims, in_dims: Output and input sizes of the adapted matrices.
    """

    rows: dict[str, slice] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    num_rows: int = 0
    out_dims: set[int] = field(default_factory=set)
    in_dims: set[int] = field(default_factory=set)


def _name_matches(module_name: str, pattern: str) -> bool:
    """A module matches a name when equal to it, ending with "." + it, or fully matching it."""
    if module_name == pattern or module_name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, module_name) is not None
    except re.error:
        return False


def _num_slices(module_name: str, fused_slices: dict[str, int]) -> int:
    for pattern, slices in fused_slices.items():
        if _name_matches(module_name, pattern):
            return slices
    return 1


def plan_rows(model: nn.Module, config: AuroraConfig) -> RowPlan:
    """Find the modules `config` adapts, validate them and assign their rows of P.

    Nothing in the model is changed, so a mistake is reported before any module is replaced.
    Modules are numbered in `named_modules()` order; a fused module takes one row per slice, and a
    module matched by `config.row_sharing` reuses the rows of its counterpart.

    Raises:
        ValueError: if no module matches, a target is not `nn.Linear`, a fused module's
            out_features is not divisible by its slice count, or a shared module has no
            adapted counterpart of the same shape.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fused_slices = config.fused_slices
    if fused_slices is None:
        fused_slices = DEFAULT_FUSED_SLICES.get(model_type, {})
    sharing_is_default = config.row_sharing is None
    row_sharing = (
        DEFAULT_ROW_SHARING.get(model_type, {}) if sharing_is_default else config.row_sharing
    )

    targets: dict[str, nn.Linear] = {}
    tuner_layer_names: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in tuner_layer_names):
            continue
        if isinstance(module, BaseTunerLayer):
            tuner_layer_names.append(name)
        if not check_target_module_exists(config, name):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"target_modules={config.target_modules!r} matches {name!r}, a "
                f"{type(base).__name__}; Aurora adapts only torch.nn.Linear. Narrow target_modules "
                "(or add the module to exclude_modules)."
            )
        targets[name] = base

    if not targets:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no module of the "
            f"{type(model).__name__}. Module names look like "
            f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]}."
        )

    plan = RowPlan()
    counterparts: dict[str, str] = {}
    for name in targets:
        for pattern, replacement in row_sharing.items():
            counterpart = re.sub(pattern, replacement, name, count=1)
            if counterpart != name:
                counterparts[name] = counterpart
                break

    for name, base in targets.items():
        slices = _num_slices(name, fused_slices)
        if base.out_features % slices:
            raise ValueError(
                f"fused_slices gives {name!r} {slices} slices, but its out_features="
                f"{base.out_features} is not divisible by {slices}."
            )
        plan.out_dims.add(base.out_features // slices)
        plan.in_dims.add(base.in_features)
        if name in counterparts and (counterparts[name] in targets or not sharing_is_default):
            continue
        plan.rows[name] = slice(plan.num_rows, plan.num_rows + slices)
        plan.num_rows += slices

    for name, counterpart in counterparts.items():
        if name in plan.rows:
            continue
        if counterpart not in plan.rows:
            raise ValueError(
                f"row_sharing maps {name!r} to {counterpart!r}, which is not an adapted module."
            )
        if targets[name].weight.shape != targets[counterpart].weight.shape:
            raise ValueError(
                f"row_sharing maps {name!r} {tuple(targets[name].weight.shape)} to {counterpart!r} "
                f"{tuple(targets[counterpart].weight.shape)}: shared modules need equal shapes."
            )
        plan.rows[name] = plan.rows[counterpart]
        plan.shared[name] = counterpart

    return plan


class AuroraModel(BaseTuner):
    """Adapts a model with Aurora: one CP factor store per adapter, read by every adapted layer.

    For each adapter, the matrices matched by `AuroraConfig.target_modules` get the updates
    dW_k = scale * U diag(lam * P[k]) V^T (see `AuroraConfig`). The factors are parameters of
    `self.aurora_store[adapter_name]`, an `AuroraFactorStore`; adapted layers hold references to it.
    Use through `peft.get_peft_model(model, AuroraConfig(...))` after `import peft_cp`.
    """

    prefix: str = "aurora_"
    tuner_layer_cls = AuroraLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state: bool = True

    def _prepare_adapter_config(
        self, peft_config: AuroraConfig, model_config: dict
    ) -> AuroraConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"target_modules is None and Aurora has no default targets for model type "
                    f"{model_type!r} (it has defaults for {sorted(self.target_module_mapping)}). "
                    "Pass target_modules, e.g. ['q_proj', 'k_proj', 'v_proj']."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self._prepare_adapter_config(
            self.peft_config[adapter_name], self.get_model_config(model)
        )
        _check_modules_to_save(model, config)
        plan = plan_rows(model, config)

        first_target = model.get_submodule(next(iter(plan.rows)))
        device = first_target.weight.device
        context = init_empty_weights if low_cpu_mem_usage else nullcontext
        with context():
            store = AuroraFactorStore(
                config.rank,
                plan.num_rows,
                plan.out_dims,
                plan.in_dims,
                init_weights=config.init_weights,
                device=device,
            )
        _check_checkpoint_shapes(config, store)

        if "aurora_store" not in self._modules:
            self.aurora_store = nn.ModuleDict()
            self._row_plans: dict[str, RowPlan] = {}
        self.aurora_store[adapter_name] = store
        self._row_plans[adapter_name] = plan
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except Exception:
            del self.aurora_store[adapter_name]
            del self._row_plans[adapter_name]
            raise

    def _create_and_replace(
        self,
        peft_config: AuroraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        store = self.aurora_store[adapter_name]
        rows = self._row_plans[adapter_name].rows[current_key]

        if isinstance(target, AuroraLayer):
            target.update_layer(
                adapter_name,
                store,
                rows,
                peft_config.scale,
                peft_config.dropout,
                inference_mode=peft_config.inference_mode,
            )
            return

        new_module = Linear(
            target, adapter_name, store, rows, peft_config.scale, peft_config.dropout
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
    ) -> None:
        # When unloading, PEFT hands the module a `modules_to_save` wrapper held back and copies
        # `child.weight` onto it. A module trained in full that has no `weight` (the BLIP recipes'
        # gated query and temperature) already holds all its parameters: it is put back as it is.
        if not hasattr(new_module, "base_layer") and not hasattr(child, "weight"):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # The factors are parameters of the store, not of the layers, so PEFT's layer-level switches
    # (set_adapter, requires_grad, delete) are extended to the stores here.

    def _set_store_requires_grad(self, trainable: set[str]) -> None:
        for name, store in self.aurora_store.items():
            store.requires_grad_(name in trainable)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        self._set_store_requires_grad(set() if inference_mode else set(names))

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for name, store in self.aurora_store.items():
            if name not in self.active_adapters:
                store.requires_grad_(False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        for name in names:
            self.aurora_store[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.aurora_store[adapter_name]
        del self._row_plans[adapter_name]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # The store is created in float32. Without autocasting it takes the base weights' dtype.
        if autocast_adapter_dtype or adapter_name not in self.aurora_store:
            return
        first_target = self.model.get_submodule(next(iter(self._row_plans[adapter_name].rows)))
        self.aurora_store[adapter_name].to(first_target.get_base_layer().weight.dtype)

    def factor_store(self, adapter_name: str | None = None) -> AuroraFactorStore:
        """The factor store of `adapter_name` (default: the active adapter)."""
        return self.aurora_store[adapter_name or self.active_adapters[0]]

    def row_plan(self, adapter_name: str | None = None) -> RowPlan:
        """Which rows of P each adapted module uses, for `adapter_name` (default: active)."""
        return self._row_plans[adapter_name or self.active_adapters[0]]

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: AuroraConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        store = model.base_model.aurora_store[adapter_name]
        _check_shapes(
            {key: tuple(value.shape) for key, value in state_dict.items()},
            store,
            source="the adapter state dict",
        )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _check_modules_to_save(model: nn.Module, config: AuroraConfig) -> None:
    """Every name in `modules_to_save` must match a module (PEFT's rule: a name ending with it).

    PEFT itself skips names that match nothing, so an adapter trained with modules added to its
    base model (a task head, `peft_cp.blip`'s gated query) would load without them, unnoticed.
    """
    names = [key for key, _ in model.named_modules()]
    missing = [m for m in config.modules_to_save or [] if not any(n.endswith(m) for n in names)]
    if missing:
        raise ValueError(
            f"modules_to_save={sorted(config.modules_to_save)!r}: the {type(model).__name__} has "
            f"no module named {missing}. If the adapter was trained with modules added to the base "
            "model, add them before get_peft_model or PeftModel.from_pretrained (for the BLIP "
            "recipes: peft_cp.blip.add_recipe_modules)."
        )


def _check_checkpoint_shapes(config: AuroraConfig, store: AuroraFactorStore) -> None:
    shapes = getattr(config, "_checkpoint_shapes", None)
    if shapes is not None:
        _check_shapes(shapes, store, source="the adapter file")


def _check_shapes(
    shapes: dict[str, tuple[int, ...]], store: AuroraFactorStore, source: str
) -> None:
    """Compare the factor shapes saved in `shapes` with those `store` has for this model."""
    for name, parameter in store.named_parameters():
        key = f"{STORE_KEY}.{name}"
        if key not in shapes:
            raise ValueError(
                f"{source} has no {key!r}; it was not saved from an Aurora adapter of this model "
                f"(factors expected: {[n for n, _ in store.named_parameters()]})."
            )
        if tuple(shapes[key]) != tuple(parameter.shape):
            raise ValueError(
                f"{source} has {key!r} of shape {tuple(shapes[key])}, but this model needs "
                f"{tuple(parameter.shape)} (rank {store.rank}, {store.num_rows} adapted matrices). "
                "Was it saved from a different model or configuration?"
            )
