"""The layers apply exactly the CP update: an oracle computed independently from the factors."""

import pytest
import torch
from peft import get_peft_model

from peft_cp import AuroraConfig, AuroraLayer


def cp_reference_delta(store, rows, d_out, d_in, scale):
    """Slices of dW[i, j, k] = scale * sum_r lam_r U[i, r] V[j, r] P[k, r], stacked by rows."""
    U, V = store.U(d_out).detach().double(), store.V(d_in).detach().double()
    P, lam = store.P.detach().double(), store.lam.detach().double()
    tensor = scale * torch.einsum("r,ir,jr,kr->ijk", lam, U, V, P)  # (d_out, d_in, N)
    return torch.cat([tensor[:, :, k] for k in range(rows.start, rows.stop)], dim=0)


def adapted_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AuroraLayer)]


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_every_layer_delta_equals_the_cp_reconstruction(tiny_retrieval, scale):
    torch.manual_seed(0)
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4, scale=scale, init_weights=False))
    store = model.base_model.factor_store()

    layers = adapted_layers(model)
    assert len(layers) == 2 * 1 + 2 * 6  # fused vision qkv + text self/cross q, k, v per layer

    for name, layer in layers:
        rows = layer.aurora_rows["default"]
        d_out = layer.out_features // (rows.stop - rows.start)
        expected = cp_reference_delta(store, rows, d_out, layer.in_features, scale)
        torch.testing.assert_close(
            layer.get_delta_weight("default").double(), expected, rtol=1e-5, atol=1e-6, msg=name
        )


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"]
)
def test_layer_output_is_base_plus_x_dw(tiny_retrieval, dtype, tolerance):
    torch.manual_seed(0)
    model = get_peft_model(tiny_retrieval.to(dtype), AuroraConfig(rank=4, init_weights=False))
    store = model.base_model.factor_store()
    assert store.P.dtype == torch.float32  # the factors stay fp32 under a low-precision base

    checked_fused = False
    for name, layer in adapted_layers(model):
        rows = layer.aurora_rows["default"]
        slices = rows.stop - rows.start
        checked_fused |= slices > 1
        x = torch.randn(3, 5, layer.in_features).to(dtype)

        delta = cp_reference_delta(store, rows, layer.out_features // slices, layer.in_features, 1)
        base = layer.get_base_layer()
        expected = base(x).double() + x.double() @ delta.T

        torch.testing.assert_close(
            layer(x).double(), expected, rtol=tolerance, atol=tolerance, msg=name
        )
    assert checked_fused


def test_fused_slices_take_consecutive_rows(tiny_retrieval):
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=2))
    plan = model.base_model.row_plan()

    qkv = plan.rows["vision_model.encoder.layers.0.self_attn.qkv"]
    query = plan.rows["text_encoder.encoder.layer.0.attention.self.query"]

    assert (qkv.start, qkv.stop) == (0, 3)
    assert query.stop - query.start == 1
    assert plan.num_rows == 2 * 3 + 2 * 6
