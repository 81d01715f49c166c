"""Aurora: CP-decomposition ("mode approximation") tuning for Hugging Face PEFT.

Importing the package registers the method with PEFT, after which `peft.get_peft_model`,
`PeftModel.from_pretrained`, `load_adapter` and `add_adapter` accept `AuroraConfig` adapters.
"""

from ._registration import register_method
from .config import AuroraConfig
from .layer import AuroraLayer, Linear
from .model import AuroraModel, RowPlan, plan_rows
from .saving import save_adapter
from .store import AuroraFactorStore

register_method(AuroraConfig, AuroraModel)

__all__ = [
    "AuroraConfig",
    "AuroraFactorStore",
    "AuroraLayer",
    "AuroraModel",
    "Linear",
    "RowPlan",
    "plan_rows",
    "save_adapter",
]
__version__ = "0.1.0"
