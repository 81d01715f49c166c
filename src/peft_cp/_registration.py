"""Make `PeftType.AURORA` a PEFT method type, so that PEFT's own entry points know the tuner.

PEFT keeps its method names in the `PeftType` enum and refuses to register a method whose name
is not a member, so the member is added first (idempotently: importing twice, or reloading the
package, changes nothing).

The member's value, which PEFT writes as "peft_type" into adapter_config.json, carries the hint
that a process must import peft_cp to load the adapter: PEFT looks the value up in its method
table, and where peft_cp was not imported the resulting `KeyError` shows that hint.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.utils import PeftType

PEFT_TYPE_NAME = "AURORA"
PEFT_TYPE_VALUE = "AURORA (load with `import peft_cp`)"
PREFIX = "aurora_"


def ensure_peft_type() -> PeftType:
    """Add `PeftType.AURORA` if it is missing and return it."""
    if PEFT_TYPE_NAME not in PeftType.__members__:
        extend_enum(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_VALUE)
    return PeftType[PEFT_TYPE_NAME]


def register_method(config_cls: type, model_cls: type) -> None:
    """Register the Aurora config and tuner with PEFT (again, after a reload of the package).

    This fills the tables `peft.register_peft_method` fills; that function itself is not used
    because it requires the enum value to equal the method's name.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    peft_type = ensure_peft_type()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is not None and registered.__qualname__ != model_cls.__qualname__:
        raise RuntimeError(f"PEFT type {PEFT_TYPE_NAME} is already registered to {registered!r}.")

    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
