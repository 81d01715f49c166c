"""UniAdapter on BLIP, as a baseline for the benchmarks (not part of the library).

UniAdapter (Lu et al., "UniAdapter: Unified Parameter-Efficient Transfer Learning for Cross-modal
Modeling", 2023) adds a bottleneck adapter to every transformer layer of the vision encoder, the
text encoder and the multimodal (fusion) encoder:

    h -> FFN(h) + up_m(ReLU(down(h))),   down: width -> r (shared),   up_m: r -> width

The down-projection of layer i is shared by the three branches (the paper's "partial weight
sharing"); each branch m in {vision, text, fusion} has its own up-projection, zero-initialised so
the adapted model starts at the base model. In BLIP the text and fusion branches are the same
text-encoder layers, run without or with cross-attention to the image; the branch is chosen per
call from whether the text encoder receives image tokens.

Parameters per layer: (width + 1) r for `down` and 3 (r + 1) width for the three `up`, i.e.
12 * (769 r + 3 * 768 (r + 1)) on BLIP-base: 4,747,776 at r = 128 and 18,908,160 at r = 512.

Not implemented: the paper's query-residual adaptation of cross-attention, which reuses the text
adapter on the cross-attention query and adds no parameters (so the counts are unaffected, and
the measured time slightly understates UniAdapter's).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import BlipForImageTextRetrieval

Branch = Literal["vision", "text", "fusion"]
BRANCHES: tuple[Branch, ...] = ("vision", "text", "fusion")


class UniAdapter(nn.Module):
    """Per-layer bottleneck adapters with one down-projection shared by all branches.

    Args:
        num_layers: Number of transformer layers (one adapter per layer and branch).
        width: Hidden size of the layers (the vision and text widths must agree to share `down`).
        rank: Bottleneck size r.
    """

    def __init__(self, num_layers: int, width: int, rank: int) -> None:
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(width, rank) for _ in range(num_layers))
        self.up = nn.ModuleDict(
            {b: nn.ModuleList(nn.Linear(rank, width) for _ in range(num_layers)) for b in BRANCHES}
        )
        for branch in self.up.values():
            for up in branch:
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)

    def forward(self, hidden: torch.Tensor, layer: int, branch: Branch) -> torch.Tensor:
        """hidden (..., width) -> the adapter's residual (..., width)."""
        return self.up[branch][layer](torch.relu(self.down[layer](hidden)))


def add_uniadapter(model: BlipForImageTextRetrieval, rank: int) -> UniAdapter:
    """Attach a UniAdapter of bottleneck `rank` to `model` through forward hooks.

    The adapter runs in parallel with each layer's feed-forward block and reads the same input.
    The adapter module is registered as `model.uniadapter`, so it moves and saves with the model.

    Raises:
        ValueError: if the vision and text encoders differ in depth or width.
    """
    vision_layers = model.vision_model.encoder.layers
    text_layers = model.text_encoder.encoder.layer
    vision_width = model.config.vision_config.hidden_size
    text_width = model.config.text_config.hidden_size
    if len(vision_layers) != len(text_layers) or vision_width != text_width:
        raise ValueError(
            "UniAdapter shares each layer's down-projection between the vision and text encoders, "
            f"so they need equal depth and width; got vision {len(vision_layers)} x {vision_width}"
            f" and text {len(text_layers)} x {text_width}."
        )

    adapter = UniAdapter(len(vision_layers), vision_width, rank)
    model.uniadapter = adapter
    state = {"branch": "text"}

    def choose_branch(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        fused = kwargs.get("encoder_hidden_states") is not None
        state["branch"] = "fusion" if fused else "text"

    model.text_encoder.register_forward_pre_hook(choose_branch, with_kwargs=True)

    for index, layer in enumerate(vision_layers):
        # BlipEncoderLayer: h + mlp(LayerNorm(h)); the adapter reads the MLP's input.
        def vision_hook(_: nn.Module, args: tuple, output: torch.Tensor, i: int = index):
            return output + adapter(args[0], i, "vision")

        layer.mlp.register_forward_hook(vision_hook)

    for index, layer in enumerate(text_layers):
        # BlipTextOutput(intermediate, attention_output) = LayerNorm(dense(intermediate) +
        # attention_output); the adapter reads the feed-forward block's input, attention_output.
        def text_hook(_: nn.Module, args: tuple, output: torch.Tensor, i: int = index):
            return output + adapter(args[1], i, state["branch"])

        layer.output.register_forward_hook(text_hook)

    return adapter
