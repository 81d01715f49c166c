"""The PEFT contract of the Aurora tuner on small and full-size BLIP models."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipForQuestionAnswering

from peft_cp import AuroraConfig, AuroraLayer


def itm(model, inputs):
    return model(**inputs).itm_score


def trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("model_cls", [BlipForImageTextRetrieval, BlipForQuestionAnswering])
@pytest.mark.parametrize(("rank", "expected"), [(128, 210_560), (64, 105_280)])
def test_blip_base_parameter_count(model_cls, rank, expected):
    with torch.device("meta"):
        model = get_peft_model(model_cls(BlipConfig()), AuroraConfig(rank=rank))

    trainable, _ = model.get_nb_trainable_parameters()
    store = model.base_model.factor_store()

    assert trainable == expected
    # 108 matrices of 768 x 768: U, V (768 x R), P (108 x R), lam (R)
    assert trainable == 2 * 768 * rank + 108 * rank + rank
    assert store.num_rows == 108
    assert (store.out_dims, store.in_dims) == ((768,), (768,))


def test_blip_large_widths_get_one_factor_per_dimension():
    config = BlipConfig(
        vision_config={"hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16}
    )
    config.text_config.num_hidden_layers = 2
    config.text_config.encoder_hidden_size = 1024
    with torch.device("meta"):
        model = get_peft_model(BlipForImageTextRetrieval(config), AuroraConfig(rank=8))
    store = model.base_model.factor_store()

    # vision q/k/v are 1024 x 1024; text self-attention and cross-attention queries 768 x 768;
    # cross-attention keys and values 768 x 1024.
    assert store.out_dims == (768, 1024)
    assert store.in_dims == (768, 1024)
    assert store.num_rows == 2 * 3 + 2 * 6


def test_step_zero_equals_the_base_model(tiny_retrieval, retrieval_inputs, clone):
    reference = itm(clone(tiny_retrieval), retrieval_inputs)

    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4))

    torch.testing.assert_close(itm(model, retrieval_inputs), reference, rtol=0, atol=0)


def test_only_the_factor_store_is_trainable(tiny_retrieval):
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4))

    assert trainable_names(model) == sorted(
        f"base_model.aurora_store.default.{n}" for n in ("P", "U_32", "U_48", "V_32", "V_48", "lam")
    )


@pytest.mark.parametrize("model_name", ["tiny_retrieval", "tiny_vqa"])
def test_one_step_changes_only_factors_and_changes_outputs(model_name, request, tiny_config):
    base = request.getfixturevalue(model_name)
    model = get_peft_model(base, AuroraConfig(rank=4))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    ids = torch.randint(3, 100, (2, 6), generator=generator)
    if model_name == "tiny_retrieval":
        loss = model(input_ids=ids, pixel_values=pixels).itm_score.logsumexp(-1).mean()
    else:
        loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss

    model.eval()
    with torch.no_grad():
        out_before = model.base_model.model.vision_model(pixels).last_hidden_state
    model.train()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("base_model.aurora_store.default.") for n in changed)
    # Only the V factors move in the first step: every other gradient is proportional to V = 0.
    v_factors = {n for n, _ in model.base_model.factor_store().named_parameters() if n[0] == "V"}
    assert {n.rsplit(".", 1)[1] for n in changed} == v_factors

    model.eval()
    with torch.no_grad():
        out_after = model.base_model.model.vision_model(pixels).last_hidden_state
    assert not torch.allclose(out_before, out_after)


def test_vqa_decoder_reuses_the_encoder_rows(tiny_vqa):
    model = get_peft_model(tiny_vqa, AuroraConfig(rank=4, init_weights=False))
    plan = model.base_model.row_plan()

    for layer in range(2):
        for attention in ("attention", "crossattention"):
            for projection in ("query", "key", "value"):
                suffix = f"encoder.layer.{layer}.{attention}.self.{projection}"
                decoder = f"text_decoder.bert.{suffix}"
                assert plan.rows[decoder] == plan.rows[f"text_encoder.{suffix}"]
                assert plan.shared[decoder] == f"text_encoder.{suffix}"

    decoder_layer = model.get_submodule("base_model.model." + "text_decoder.bert." + suffix)
    encoder_layer = model.get_submodule("base_model.model." + "text_encoder." + suffix)
    torch.testing.assert_close(
        decoder_layer.get_delta_weight("default"), encoder_layer.get_delta_weight("default")
    )
    assert plan.num_rows == 2 * 3 + 2 * 6


def test_row_sharing_can_be_switched_off(tiny_vqa):
    model = get_peft_model(tiny_vqa, AuroraConfig(rank=4, row_sharing={}))

    assert model.base_model.row_plan().num_rows == 2 * 3 + 2 * 6 * 2
    assert not model.base_model.row_plan().shared


def test_merge_unmerge_round_trip(tiny_retrieval, retrieval_inputs):
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4, init_weights=False))
    weight = (
        model.get_submodule("base_model.model.text_encoder.encoder.layer.0.attention.self.query")
        .get_base_layer()
        .weight
    )
    original = weight.detach().clone()
    adapted = itm(model, retrieval_inputs)

    model.merge_adapter()
    merged = itm(model, retrieval_inputs)
    model.unmerge_adapter()

    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(itm(model, retrieval_inputs), adapted, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_returns_a_plain_model(tiny_retrieval, retrieval_inputs):
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4, init_weights=False))
    adapted = itm(model, retrieval_inputs)

    merged = model.merge_and_unload()

    assert type(merged) is BlipForImageTextRetrieval
    assert not any(isinstance(m, AuroraLayer) for m in merged.modules())
    torch.testing.assert_close(itm(merged, retrieval_inputs), adapted, rtol=1e-4, atol=1e-5)


def test_unload_restores_the_base_model(tiny_retrieval, retrieval_inputs, clone):
    reference = itm(clone(tiny_retrieval), retrieval_inputs)
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4, init_weights=False))

    base = model.unload()

    assert not any(isinstance(m, AuroraLayer) for m in base.modules())
    torch.testing.assert_close(itm(base, retrieval_inputs), reference, rtol=0, atol=0)


def test_disable_adapter_gives_exact_base_outputs(tiny_retrieval, retrieval_inputs, clone):
    reference = itm(clone(tiny_retrieval), retrieval_inputs)
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4, init_weights=False))
    adapted = itm(model, retrieval_inputs)

    with model.disable_adapter():
        disabled = itm(model, retrieval_inputs)

    torch.testing.assert_close(disabled, reference, rtol=0, atol=0)
    assert not torch.allclose(adapted, reference)
    torch.testing.assert_close(itm(model, retrieval_inputs), adapted, rtol=0, atol=0)


def test_named_adapters_have_their_own_stores(tiny_retrieval, retrieval_inputs):
    torch.manual_seed(0)
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4, init_weights=False))
    first = itm(model, retrieval_inputs)
    model.add_adapter("second", AuroraConfig(rank=2, init_weights=False))

    stores = model.base_model.aurora_store
    assert set(stores) == {"default", "second"} and stores["second"].rank == 2
    torch.testing.assert_close(itm(model, retrieval_inputs), first)  # still "default" active
    assert all(not p.requires_grad for p in stores["second"].parameters())

    model.set_adapter("second")
    second = itm(model, retrieval_inputs)
    assert not torch.allclose(first, second)
    assert all(p.requires_grad for p in stores["second"].parameters())
    assert all(not p.requires_grad for p in stores["default"].parameters())

    model.delete_adapter("default")
    assert set(model.base_model.aurora_store) == {"second"}
    assert model.active_adapters == ["second"]
    torch.testing.assert_close(itm(model, retrieval_inputs), second)


def test_modules_to_save_are_trained_and_saved(tiny_retrieval, tmp_path):
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=4, modules_to_save=["itm_head"]))

    names = trainable_names(model)
    assert "base_model.model.itm_head.modules_to_save.default.weight" in names
    model.save_pretrained(tmp_path)

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.itm_head.weight" in saved


class Gate(nn.Module):
    """A module trained in full that, unlike a Linear, has no `weight`."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(3))


def test_merge_and_unload_keeps_trained_modules_without_a_weight(tiny_retrieval, retrieval_inputs):
    tiny_retrieval.gate = Gate()
    config = AuroraConfig(rank=4, init_weights=False, modules_to_save=["gate", "itm_head"])
    model = get_peft_model(tiny_retrieval, config)
    with torch.no_grad():
        model.base_model.model.gate.modules_to_save["default"].scale.fill_(2.0)
        model.base_model.model.itm_head.modules_to_save["default"].bias.fill_(0.5)
    adapted = itm(model, retrieval_inputs)

    plain = model.merge_and_unload()

    assert type(plain.gate) is Gate and type(plain.itm_head) is nn.Linear
    torch.testing.assert_close(plain.gate.scale, torch.full((3,), 2.0))
    torch.testing.assert_close(plain.itm_head.bias, torch.full((2,), 0.5))
    torch.testing.assert_close(plain(**retrieval_inputs).itm_score, adapted, rtol=1e-4, atol=1e-5)


def test_factor_store_can_follow_the_base_dtype(tiny_retrieval):
    model = get_peft_model(
        tiny_retrieval.to(torch.bfloat16), AuroraConfig(rank=4), autocast_adapter_dtype=False
    )

    assert model.base_model.factor_store().P.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"rank must be a positive integer, got 0"),
        ({"rank": 2.5}, r"rank must be a positive integer, got 2.5"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        ({"fused_slices": {"qkv": 0}}, r"fused_slices\['qkv'\] must be a positive integer"),
        ({"layers_to_transform": [0]}, r"layers_to_transform .* not supported yet"),
    ],
)
def test_config_validation(kwargs, message):
    error = NotImplementedError if "layers_to_transform" in kwargs else ValueError
    with pytest.raises(error, match=message):
        AuroraConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": ["nope"]}, r"target_modules=\{'nope'\} matches no module"),
        ({"target_modules": ["embeddings"]}, r"'vision_model.embeddings', a BlipVisionEmbeddings"),
        ({"fused_slices": {"qkv": 5}}, r"out_features=144 is not divisible by 5"),
        (
            {"row_sharing": {r"^text_encoder\.": "missing."}},
            r"row_sharing maps 'text_encoder.* to 'missing.*not an adapted module",
        ),
        (
            {
                "target_modules": r".*layer\.0\.crossattention\.self\.(query|key)",
                "row_sharing": {"key$": "query"},
            },
            r"shared modules need equal shapes",
        ),
        (
            {"modules_to_save": ["itm_head", "gated_query"]},
            r"has no module named \['gated_query'\].*peft_cp.blip.add_recipe_modules",
        ),
    ],
)
def test_targeting_errors_leave_the_model_untouched(tiny_retrieval, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_retrieval, AuroraConfig(rank=4, **kwargs))

    assert not any(isinstance(m, AuroraLayer) for m in tiny_retrieval.modules())


def test_unknown_model_type_needs_target_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = {"model_type": "mlp"}

    with pytest.raises(ValueError, match=r"no default targets for model type 'mlp'"):
        get_peft_model(model, AuroraConfig(rank=2))


def test_plain_torch_module_with_explicit_targets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6))

    peft_model = get_peft_model(model, AuroraConfig(rank=3, target_modules=["0", "2"]))

    assert peft_model.get_nb_trainable_parameters()[0] == 2 * 6 * 3 + 2 * 3 + 3
    assert isinstance(peft_model, PeftModel)
