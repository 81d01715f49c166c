"""The modules the BLIP recipes add to a base model, and loading an adapter trained with them.

The retrieval and question-answering recipes train, besides the factor store, modules that BLIP
does not have: the Gated Query Transformation (`gated_query`) and the contrastive temperature
(`itc_temperature`). They are saved with the adapter as `modules_to_save`, so the base model must
have them again before the adapter is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from peft import PeftConfig, PeftModel
from torch import nn

from .gated_query import GATE_MODULE_NAME, add_gated_query
from .retrieval import TEMPERATURE_MODULE_NAME, add_temperature

# Name in `modules_to_save` -> the function that adds that module to a base model.
RECIPE_MODULES: dict[str, Callable[[nn.Module], list[str]]] = {
    GATE_MODULE_NAME: add_gated_query,
    TEMPERATURE_MODULE_NAME: add_temperature,
}


def add_recipe_modules(model: nn.Module, modules_to_save: Iterable[str] | None) -> list[str]:
    """Add to `model` the recipe modules named in `modules_to_save`; returns their names.

    Other names (modules BLIP has, such as `itm_head`) are left alone, and a module the model
    already has is not added again.
    """
    names = []
    for name in modules_to_save or ():
        if name in RECIPE_MODULES:
            names += RECIPE_MODULES[name](model)
    return names


def load_recipe_adapter(
    model: nn.Module, adapter: str | os.PathLike[str], **kwargs: Any
) -> PeftModel:
    """`PeftModel.from_pretrained(model, adapter)` for an adapter saved by the BLIP recipes.

    The recipe modules the adapter saved are added to `model` first (they start as the identity:
    the gates at zero, the temperature at BLIP's 0.07), then overwritten by the saved values.
    Keyword arguments go to `PeftModel.from_pretrained`.
    """
    config = PeftConfig.from_pretrained(str(adapter))
    add_recipe_modules(model, config.modules_to_save)
    return PeftModel.from_pretrained(model, adapter, **kwargs)
