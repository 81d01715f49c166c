"""Small BLIP configurations for tests and offline demos, and the examples' settings files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import BlipConfig


def small_blip_config(
    vision_width: int = 48,
    text_width: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    vocab_size: int = 100,
    projection_dim: int = 16,
    init_std: float = 0.02,
) -> BlipConfig:
    """A BLIP config of the given sizes (BLIP-base is 768 / 768 / 12 layers / 12 heads / 384 px).

    The vision and text widths differ by default, so that the cross-attention keys and values are
    not square: every code path that must handle several matrix shapes is exercised. `init_std`
    is the standard deviation of the random weights; a model trained from scratch on a small demo
    wants about 1/sqrt(width), so that attention mixes tokens from the start.
    """
    special_tokens = {"bos_token_id": 1, "sep_token_id": 2, "pad_token_id": 0}
    text_config = {
        "hidden_size": text_width,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": 2 * text_width,
        "vocab_size": vocab_size,
        "encoder_hidden_size": vision_width,
        "max_position_embeddings": 64,
        "initializer_range": init_std,
        **special_tokens,
    }
    vision_config = {
        "hidden_size": vision_width,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": 2 * vision_width,
        "image_size": image_size,
        "patch_size": patch_size,
        # BLIP's vision default (1e-10) suits loading pre-trained weights; a randomly initialised
        # encoder with it outputs ~1e-7 and passes back no gradient.
        "initializer_range": init_std,
    }
    return BlipConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=projection_dim
    )


def read_settings(path: str | Path, allowed: Iterable[str]) -> dict[str, Any]:
    """The settings of a JSON configuration file (one object), checked against `allowed` keys.

    Raises:
        ValueError: naming the file (and line, for invalid JSON) when it cannot be parsed, is not
            an object, or holds a key outside `allowed`.
        FileNotFoundError: when `path` does not exist.
    """
    path = Path(path)
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}).") from error

    if not isinstance(settings, dict):
        raise ValueError(
            f"{path}: expected a JSON object of settings, got {type(settings).__name__}."
        )
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(
            f"{path}: unknown setting(s) {unknown}; expected some of {sorted(allowed)}."
        )
    return settings
