"""Configuration of the Aurora tuner."""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft.config import PeftConfig

from ._registration import ensure_peft_type

logger = logging.getLogger(__name__)

# Modules adapted when `target_modules` is not given, keyed by `model.config.model_type`. For BLIP
# these are the vision encoder's fused `self_attn.qkv` and every query/key/value projection of the
# text encoder (self- and cross-attention) and, for question answering, of the answer decoder:
# 108 matrices of 768 x 768 on BLIP-base retrieval.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "blip": ["qkv", "query", "key", "value"],
}

# Fused projections whose output stacks several matrices, keyed by model type.
DEFAULT_FUSED_SLICES: dict[str, dict[str, int]] = {
    "blip": {"qkv": 3},
}

# Modules that reuse the rows of P of another module, as (regex, replacement) on module names.
# BLIP question answering shares the factors of the multimodal encoder with the answer decoder.
DEFAULT_ROW_SHARING: dict[str, dict[str, str]] = {
    "blip": {r"^text_decoder\.bert\.": "text_encoder."},
}

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class AuroraConfig(PeftConfig):
    """Configuration of Aurora, a CP-decomposition ("mode approximation") tuner.

    The updates of all adapted matrices W_1..W_N form one tensor of shape d_out x d_in x N, learnt
    in rank-`rank` CP form: dW_k = scale * U diag(lam * P[k]) V^T. U and V are shared by every
    adapted matrix of the model, P has one row per matrix and lam one entry per rank component.
    See Wang et al., "Parameter-efficient Tuning of Large-scale Multimodal Foundation Model",
    NeurIPS 2023.

    Args:
        rank: Number R of CP components.
        scale: Constant multiplying every update (dW_k = scale * U diag(lam * P[k]) V^T).
        dropout: Dropout probability on the adapter's input.
        target_modules: Module names to adapt: a list of names (a module matches when its name is
            one of them or ends with "." + one of them) or a regex that must match the full name.
            `None` uses the model type's default (BLIP: fused vision `qkv` and the text `query`,
            `key`, `value` projections).
        exclude_modules: Module names (list or regex) never adapted.
        fused_slices: Fused projections whose output stacks several matrices, as {name: k}: a
            module matched by `name` (same rule as `target_modules`) counts as k matrices of
            out_features / k rows each, with one row of P per slice. `None` uses the model type's
            default (BLIP: {"qkv": 3}).
        row_sharing: {regex: replacement} on module names: a module whose name the regex matches
            reuses the P rows of the module named by the substitution (its update is identical).
            `None` uses the model type's default (BLIP: the question-answering decoder reuses the
            rows of the text encoder); `{}` disables sharing.
        modules_to_save: Modules trained fully and saved with the adapter, e.g. task heads.
        init_weights: If True, V = 0 so that the adapted model equals the base model at step 0. If
            False, every factor is random and non-zero (for tests and debugging).

    Factors are keyed by dimension: every adapted matrix with input size d_in uses V_{d_in} and
    every matrix with output size d_out uses U_{d_out}. With one width throughout (BLIP-base)
    there is exactly one U and one V; BLIP-large (vision 1024, text 768) gets U_768, U_1024,
    V_768 and V_1024. P and lam are shared by all shapes.
    """

    rank: int = field(default=128, metadata={"help": "Number of CP components R."})
    scale: float = field(default=1.0, metadata={"help": "Constant multiplying every update."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (list) or a full-match regex of modules to adapt."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (list) or a full-match regex of modules to skip."}
    )
    fused_slices: dict[str, int] | None = field(
        default=None, metadata={"help": "{module name: number of stacked matrices}."}
    )
    row_sharing: dict[str, str] | None = field(
        default=None, metadata={"help": "{regex: replacement}: modules reusing another's P rows."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "V = 0 (identity at step 0); False: all factors random."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, repr=False)
    layers_pattern: list[str] | str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()

        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_to_transform is not None or self.layers_pattern is not None:
            raise NotImplementedError(
                "layers_to_transform and layers_pattern are not supported yet by Aurora: "
                "select layers with a regex in target_modules instead."
            )

        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.fused_slices is not None:
            for name, slices in self.fused_slices.items():
                if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
                    raise ValueError(
                        f"fused_slices[{name!r}] must be a positive integer, got {slices!r}."
                    )

        # Shapes of the tensors in the adapter file this config was loaded with (if any), checked
        # against the model before any module is replaced. Not a dataclass field: never saved.
        self._checkpoint_shapes: dict[str, tuple[int, ...]] | None = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> AuroraConfig:
        """Load the config and, for a local folder, validate the adapter file next to it.

        The safetensors header is read and checked against the file size, so a truncated or
        corrupt adapter is reported here, before `PeftModel.from_pretrained` touches the model.
        """
        config = super().from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        folder = Path(pretrained_model_name_or_path)
        if subfolder:
            folder = folder / subfolder
        weights = folder / ADAPTER_WEIGHTS_NAME
        if weights.is_file():
            config._checkpoint_shapes = read_safetensors_shapes(weights)
        return config


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Read tensor shapes from a safetensors header, checking that the file is complete.

    Raises:
        ValueError: naming the file when the header is unreadable or the data is truncated.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header).")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(
                f"{path}: truncated or corrupt: the header claims {header_len} bytes but the file "
                f"has {size - 8} after the length prefix."
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: corrupt safetensors header ({error}).") from None

    data_len = size - 8 - header_len
    shapes = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if end > data_len:
            raise ValueError(
                f"{path}: truncated: tensor {key!r} ends at byte {end} of the data section but the "
                f"file holds only {data_len} data bytes."
            )
        shapes[key] = tuple(info["shape"])
    return shapes
