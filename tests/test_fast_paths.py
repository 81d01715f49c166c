"""The fast path (shared x V, in-place up-projection) computes what the reference path computes."""

import gc

import pytest
import torch
from peft import get_peft_model
from transformers import BlipForImageTextRetrieval

from peft_cp import AuroraConfig, AuroraLayer
from peft_cp.blip.configs import small_blip_config
from peft_cp.functional import add_cp_update_
from peft_cp.layer import Linear as AuroraLinear

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["fp32", "bf16"])


def adapted(base, clone, dtype=torch.float32, **config):
    """Two identical Aurora models of `base`: (fast path, reference path)."""
    torch.manual_seed(0)
    config = {"rank": 4, "init_weights": False, "scale": 0.5, **config}  # scale: its paths too
    fast = get_peft_model(clone(base).to(dtype), AuroraConfig(**config))
    reference = clone(fast)
    reference.base_model.factor_store().fast_path = False
    assert fast.base_model.factor_store().fast_path
    return fast, reference


def both_heads(model, inputs):
    """Matching logits and cosine similarities: every adapted layer, cross-attention included."""
    return torch.cat([model(**inputs).itm_score, model(**inputs, use_itm_head=False).itm_score], 1)


def forward_backward(model, inputs, autocast=False):
    pixels = inputs["pixel_values"].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = both_heads(model, {**inputs, "pixel_values": pixels})
    outputs.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return outputs.detach(), grads, pixels.grad


def assert_same_outputs_and_gradients(fast, reference, inputs, dtype):
    fast_out, fast_grads, fast_pixel_grad = forward_backward(fast, inputs)
    ref_out, ref_grads, ref_pixel_grad = forward_backward(reference, inputs)

    torch.testing.assert_close(fast_out, ref_out, **TOLERANCES[dtype])
    assert fast_grads.keys() == ref_grads.keys()
    fast_grads["pixel_values"], ref_grads["pixel_values"] = fast_pixel_grad, ref_pixel_grad
    for name in ref_grads:
        # Gradients sum over every token and layer, or are tiny (the pixels'), so each element
        # is compared to the tensor's largest (a merged weight rounds differently: ~2e-6 in fp32).
        scale = ref_grads[name].abs().max().item()
        rtol = TOLERANCES[dtype]["rtol"]
        torch.testing.assert_close(
            fast_grads[name], ref_grads[name], rtol=rtol, atol=rtol * scale, msg=name
        )


@DTYPES
def test_outputs_and_gradients_match_the_reference(tiny_retrieval, retrieval_inputs, clone, dtype):
    fast, reference = adapted(tiny_retrieval, clone, dtype)
    inputs = {**retrieval_inputs, "pixel_values": retrieval_inputs["pixel_values"].to(dtype)}
    assert len(fast.base_model.factor_store().state_dict()) == 6  # two widths: two U, two V
    assert_same_outputs_and_gradients(fast, reference, inputs, dtype)


@pytest.mark.parametrize("widths", [(48, 32), (16, 16)], ids=["per_token", "merged"])
def test_autocast_stays_within_bf16_error_of_the_fp32_reference(retrieval_inputs, clone, widths):
    # What Accelerate's mixed precision runs: fp32 weights and factors, bf16 matrix products.
    # The fast backward computes the factor gradients in fp32, so it lands closer to the fp32
    # values than the reference path under autocast (per token: up to 2.8 % of each tensor's
    # largest element, against 5.9 %); it is compared with the fp32 reference computation.
    torch.manual_seed(0)
    config = small_blip_config(vision_width=widths[0], text_width=widths[1])
    fast, reference = adapted(BlipForImageTextRetrieval(config).eval(), clone)

    fast_out, fast_grads, fast_pixel_grad = forward_backward(fast, retrieval_inputs, autocast=True)
    exact_out, exact_grads, exact_pixel_grad = forward_backward(reference, retrieval_inputs)

    torch.testing.assert_close(
        fast_out.float(), exact_out, rtol=0, atol=1e-2 * exact_out.abs().max()
    )
    fast_grads["pixel_values"], exact_grads["pixel_values"] = fast_pixel_grad, exact_pixel_grad
    for name, exact in exact_grads.items():
        error = (fast_grads[name] - exact).abs().max() / exact.abs().max()
        assert error < 4e-2, (name, error.item())


# Equal vision and text widths put the image tokens, the text hidden states and the attention
# outputs in one V (as in BLIP-base), so they compete for the same cache entries.
@pytest.mark.parametrize(("num_layers", "vision_width"), [(2, 48), (5, 32)])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_inputs_read_by_several_layers_are_projected_once(
    retrieval_inputs, clone, grad_mode, num_layers, vision_width, monkeypatch
):
    torch.manual_seed(0)
    config = small_blip_config(num_layers=num_layers, vision_width=vision_width)
    base = BlipForImageTextRetrieval(config).eval()
    fast, reference = adapted(base, clone)
    store = fast.base_model.factor_store()
    projections = []
    original = type(store).down_project

    def counting(self, x, d_in, reuse=True):
        hidden = original(self, x, d_in, reuse)
        if all(hidden is not seen for seen in projections):
            projections.append(hidden)
        return hidden

    monkeypatch.setattr(type(store), "down_project", counting)
    store.merge_when_cheaper = False  # what is counted here is the sharing of the per-token path
    with torch.set_grad_enabled(grad_mode):
        output = fast(**retrieval_inputs).itm_score
        expected = reference(**retrieval_inputs).itm_score

    # Per layer: vision qkv (fused already), text self-attention q/k/v (one input) and the
    # cross-attention query (its own input); once: the cross-attention keys and values of every
    # layer (all read the image tokens).
    assert len(projections) == num_layers * (1 + 1 + 1) + 1
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@DTYPES
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_layers_with_many_tokens_run_merged_and_match_the_reference(
    retrieval_inputs, clone, dtype, mode, monkeypatch
):
    # Widths 16: the 2 x 17 image tokens reach twice the width, the 2 x 7 text tokens do not.
    torch.manual_seed(0)
    base = BlipForImageTextRetrieval(small_blip_config(vision_width=16, text_width=16)).eval()
    fast, reference = adapted(base, clone, dtype)
    inputs = {**retrieval_inputs, "pixel_values": retrieval_inputs["pixel_values"].to(dtype)}
    weights_before = {n: p.clone() for n, p in fast.named_parameters()}

    tokens, merged = {}, set()  # layer name -> tokens of its first call; layers run merged

    def count_tokens(name, x):
        tokens.setdefault(name, x[..., 0].numel())

    for name, layer in fast.named_modules():
        if isinstance(layer, AuroraLayer):
            layer.register_forward_pre_hook(lambda _, args, name=name: count_tokens(name, args[0]))
    merged_forward = AuroraLinear._merged_forward

    def recording(self, x, stores):
        merged.add(next(name for name, layer in fast.named_modules() if layer is self))
        return merged_forward(self, x, stores)

    monkeypatch.setattr(AuroraLinear, "_merged_forward", recording)
    if mode == "grad":
        assert_same_outputs_and_gradients(fast, reference, inputs, dtype)
    else:
        with getattr(torch, mode)():
            output = both_heads(fast, inputs)
            expected = both_heads(reference, inputs)
        torch.testing.assert_close(output, expected, **TOLERANCES[dtype])

    widths = {name: fast.get_submodule(name).in_features for name in tokens}
    assert merged == {name for name in tokens if tokens[name] >= 2 * widths[name]}
    assert any("qkv" in name for name in merged) and any("crossattention" in n for n in merged)
    assert any(name not in merged for name in tokens)  # the text layers stay per token
    for name, parameter in fast.named_parameters():  # the base weights were copied, not changed
        assert torch.equal(parameter, weights_before[name]), name


def test_no_projection_is_kept_after_backward_or_after_no_grad(
    tiny_retrieval, retrieval_inputs, clone
):
    fast, _ = adapted(tiny_retrieval, clone)
    cache = fast.base_model.factor_store()._down_cache

    with torch.no_grad():
        fast(**retrieval_inputs)
    gc.collect()
    assert len(cache) == 0

    fast(**retrieval_inputs).itm_score.sum().backward()
    assert len(cache) == 0


def test_an_in_place_change_of_the_input_or_of_v_is_never_served_stale(tiny_retrieval, clone):
    fast, reference = adapted(tiny_retrieval, clone)
    name = "base_model.model.text_encoder.encoder.layer.0.attention.self.query"
    fast_layer, ref_layer = fast.get_submodule(name), reference.get_submodule(name)
    x = torch.randn(2, 5, fast_layer.in_features)

    fast_layer(x)
    x.mul_(2.0)  # same tensor object, new contents
    torch.testing.assert_close(fast_layer(x), ref_layer(x), rtol=1e-5, atol=1e-6)

    with torch.no_grad():  # what an optimizer step does to V
        for model in (fast, reference):
            model.base_model.factor_store().V(fast_layer.in_features).add_(0.5)
    torch.testing.assert_close(fast_layer(x), ref_layer(x), rtol=1e-5, atol=1e-6)


def test_inference_mode_matches_the_reference(tiny_retrieval, retrieval_inputs, clone):
    fast, reference = adapted(tiny_retrieval, clone)
    with torch.inference_mode():
        torch.testing.assert_close(
            both_heads(fast, retrieval_inputs),
            both_heads(reference, retrieval_inputs),
            rtol=1e-5,
            atol=1e-6,
        )


@DTYPES
def test_dropout_draws_the_same_masks_per_layer_as_the_reference(
    tiny_retrieval, retrieval_inputs, clone, dtype
):
    """Training: each layer draws its own mask (no sharing), in the reference's order."""
    fast, reference = adapted(tiny_retrieval, clone, dtype, dropout=0.5)
    fast.train()
    reference.train()
    inputs = {**retrieval_inputs, "pixel_values": retrieval_inputs["pixel_values"].to(dtype)}

    torch.manual_seed(123)
    fast_out, fast_grads, _ = forward_backward(fast, inputs)
    torch.manual_seed(123)
    ref_out, ref_grads, _ = forward_backward(reference, inputs)
    torch.manual_seed(7)
    other_out, _, _ = forward_backward(reference, inputs)

    torch.testing.assert_close(fast_out, ref_out, **TOLERANCES[dtype])
    for name in ref_grads:
        scale = max(ref_grads[name].abs().max().item(), 1.0)
        tolerance = TOLERANCES[dtype]
        torch.testing.assert_close(
            fast_grads[name],
            ref_grads[name],
            rtol=tolerance["rtol"],
            atol=tolerance["atol"] * scale,
            msg=name,
        )
    assert not torch.allclose(other_out, ref_out)  # the masks are random: the check has teeth


def test_dropout_in_eval_mode_shares_and_matches(tiny_retrieval, retrieval_inputs, clone):
    fast, reference = adapted(tiny_retrieval, clone, dropout=0.5)
    fast.eval()
    reference.eval()

    torch.testing.assert_close(
        both_heads(fast, retrieval_inputs),
        both_heads(reference, retrieval_inputs),
        rtol=1e-5,
        atol=1e-6,
    )


@DTYPES
@pytest.mark.parametrize("num_slices", [1, 3])
def test_add_cp_update_matches_the_plain_expression(dtype, num_slices):
    generator = torch.Generator().manual_seed(0)
    d_out, rank, scale = 6, 4, 0.5
    result = torch.randn(15, num_slices * d_out, generator=generator).to(dtype)
    grad = torch.randn(15, num_slices * d_out, generator=generator).to(dtype)
    leaves = {
        "hidden": torch.randn(15, rank, generator=generator),
        "u": torch.randn(d_out, rank, generator=generator),
        "coefficients": torch.randn(num_slices, rank, generator=generator),
    }
    for leaf in leaves.values():
        leaf.requires_grad_(True)

    # Independent of the function's own stacking: each slice's block is written out.
    hidden, u, coefficients = leaves.values()
    blocks = [hidden @ (u * (scale * coefficients[s])).T for s in range(num_slices)]
    expected = result + torch.cat(blocks, dim=1).to(dtype)
    expected.backward(grad)
    expected_grads = {name: leaf.grad for name, leaf in leaves.items()}
    for leaf in leaves.values():
        leaf.grad = None

    base = result.clone().requires_grad_(True)
    output = add_cp_update_(base.clone(), hidden, u, coefficients, scale)
    output.backward(grad)

    torch.testing.assert_close(output, expected, **TOLERANCES[dtype])
    torch.testing.assert_close(base.grad, grad)
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad, expected_grads[name], **TOLERANCES[dtype], msg=name)


def test_fast_path_is_on_by_default_and_merging_still_works(
    tiny_retrieval, retrieval_inputs, clone
):
    fast, reference = adapted(tiny_retrieval, clone)
    assert all(
        layer.aurora_stores["default"].fast_path
        for layer in fast.modules()
        if isinstance(layer, AuroraLayer)
    )
    unmerged = fast(**retrieval_inputs).itm_score
    fast.merge_adapter()
    torch.testing.assert_close(fast(**retrieval_inputs).itm_score, unmerged, rtol=1e-4, atol=1e-5)


def _graph_node_names(output: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5)], ids=["1d", "2d", "3d"])
def test_in_place_update_never_goes_through_a_view(shape):
    # Adding into a view of the base output makes autograd copy and zero-fill the whole output
    # gradient of every layer (CopySlices, AsStridedBackward0); the update must land in the
    # base layer's own 2-D output instead.
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(5, 6)),
        AuroraConfig(rank=2, target_modules=["0"], init_weights=False),
    )
    model.base_model.factor_store().merge_when_cheaper = False  # 6 tokens: more than width 5
    x = torch.randn(shape)

    output = model(x)

    assert output.shape == (*shape[:-1], 6)
    nodes = _graph_node_names(output)
    assert "_AddCPUpdateInPlaceBackward" in nodes
    assert not nodes & {"CopySlices", "AsStridedBackward0"}, nodes
    layer = model.base_model.model[0]
    expected = layer.base_layer(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


def test_a_hooked_base_layer_is_never_bypassed(monkeypatch):
    # Hooks run only when the base layer does; an Accelerate offloading hook brings its weight in.
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(5, 6)),
        AuroraConfig(rank=2, target_modules=["0"], init_weights=False),
    )
    layer = model.base_model.model[0]
    x = torch.randn(20, 5)  # four times the width: merged unless hooked
    merged_calls, hook_calls = [], []
    merged_forward = AuroraLinear._merged_forward
    monkeypatch.setattr(
        AuroraLinear,
        "_merged_forward",
        lambda *args: merged_calls.append(1) or merged_forward(*args),
    )

    with torch.no_grad():
        expected = layer.base_layer(x) + x @ layer.get_delta_weight("default").T
        unhooked = model(x)
        layer.base_layer.register_forward_hook(lambda *_: hook_calls.append(1))
        hooked = model(x)

    assert merged_calls == [1] and hook_calls == [1]
    torch.testing.assert_close(unhooked, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [4, 20], ids=["per_token", "merged"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing_recomputes_the_same_gradients(tokens, reentrant):
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.GELU(), torch.nn.Linear(6, 5)),
        AuroraConfig(rank=2, target_modules=["0", "2"], init_weights=False),
    )
    x = torch.randn(tokens, 5, requires_grad=True)

    def gradients(checkpointed: bool) -> list[torch.Tensor]:
        if checkpointed:
            output = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant)
        else:
            output = model(x)
        output.pow(2).sum().backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = [x.grad.clone(), *(p.grad.clone() for p in trainable)]
        x.grad = None
        model.zero_grad(set_to_none=True)
        return grads

    expected = gradients(checkpointed=False)
    for grad, reference in zip(gradients(checkpointed=True), expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)
