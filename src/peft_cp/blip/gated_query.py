"""Gated Query Transformation: carry the text query representation past the cross-attention fusion.

In a BLIP text layer the query tokens pass through self-attention, then cross-attention to the
image, then the feed-forward block. Aurora adds, in every text-encoder layer that runs
cross-attention, two learnt affine gates on the attention outputs and feeds them past the
feed-forward block:

    out = FFN(c) + 0.1 * (s_self * a + b_self) + 0.1 * (s_cross * c + b_cross)

where a is the self-attention output (the text query representation), c the cross-attention
output, and s_self, b_self, s_cross, b_cross are vectors of the hidden size (4 x 768 values per
layer on BLIP-base, 36,864 for the 12 layers). They start at zero, so the model is unchanged at
step 0. Text-only passes (no image) are not changed.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_MODULE_NAME = "gated_query"


class GatedQueryTransformation(nn.Module):
    """The four gate vectors of one text layer; `forward(a, c)` gives the residual to add."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.scale_self = nn.Parameter(torch.zeros(hidden_size))
        self.shift_self = nn.Parameter(torch.zeros(hidden_size))
        self.scale_cross = nn.Parameter(torch.zeros(hidden_size))
        self.shift_cross = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, self_output: torch.Tensor, cross_output: torch.Tensor) -> torch.Tensor:
        """(B, L, D), (B, L, D) -> (B, L, D)."""
        text = self_output * self.scale_self + self.shift_self
        fused = cross_output * self.scale_cross + self.shift_cross
        return 0.1 * (text + fused)


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _install(layer: nn.Module) -> None:
    # Hooks capture the two attention outputs of the current call and add the gated residual to
    # the layer's output; nothing is kept once the layer has returned.
    captured: dict[str, torch.Tensor] = {}

    def keep_self_output(module, args, output):
        captured["self"] = _first(output)

    def keep_cross_output(module, args, output):
        captured["cross"] = _first(output)

    def add_residual(module, args, output):
        self_output, cross_output = captured.pop("self", None), captured.pop("cross", None)
        if cross_output is None:
            return output
        residual = getattr(layer, GATE_MODULE_NAME)(self_output, cross_output)
        if isinstance(output, tuple):
            return (output[0] + residual, *output[1:])
        return output + residual

    layer.attention.register_forward_hook(keep_self_output)
    layer.crossattention.register_forward_hook(keep_cross_output)
    layer.register_forward_hook(add_residual)


def add_gated_query(model: nn.Module, component: str = "text_encoder") -> list[str]:
    """Add a `GatedQueryTransformation` to every cross-attention layer of `model.<component>`.

    Call it on the base model before `get_peft_model` (and before `PeftModel.from_pretrained`
    when loading an adapter trained with it), and pass the returned names as
    `AuroraConfig(modules_to_save=...)`, so the gates are trained, counted and saved with the
    adapter.

    Returns:
        The module name to list in `modules_to_save` (["gated_query"]).
    """
    encoder = getattr(model, component, None)
    if encoder is None:
        raise ValueError(
            f"component={component!r}: {type(model).__name__} has no such submodule; Gated Query "
            "Transformation needs a BLIP text encoder (BlipForImageTextRetrieval or "
            "BlipForQuestionAnswering)."
        )
    layers = [m for m in encoder.modules() if hasattr(m, "crossattention")]
    if not layers:
        raise ValueError(f"{component!r} has no cross-attention layers to gate.")

    for layer in layers:
        if hasattr(layer, GATE_MODULE_NAME):
            continue
        reference = next(layer.parameters())
        gate = GatedQueryTransformation(layer.crossattention.output.dense.out_features)
        layer.add_module(GATE_MODULE_NAME, gate.to(reference.device))
        _install(layer)
    return [GATE_MODULE_NAME]
