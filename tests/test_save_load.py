"""Adapter files: one copy of each factor, a fresh-process round trip, and safe failures."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BlipForImageTextRetrieval

import peft_cp
from peft_cp import AuroraConfig, AuroraLayer
from peft_cp.blip.configs import small_blip_config

WEIGHTS = "adapter_model.safetensors"


def save_trained_adapter(model, folder, **config):
    torch.manual_seed(0)
    peft_model = get_peft_model(model, AuroraConfig(init_weights=False, **config))
    peft_model.save_pretrained(folder)
    return peft_model


def test_each_factor_is_saved_once(tiny_retrieval, tmp_path):
    model = save_trained_adapter(tiny_retrieval, tmp_path, rank=4)

    saved = load_file(tmp_path / WEIGHTS)

    assert sorted(saved) == [
        f"base_model.aurora_store.{n}" for n in ("P", "U_32", "U_48", "V_32", "V_48", "lam")
    ]
    trainable, _ = model.get_nb_trainable_parameters()
    assert sum(t.numel() for t in saved.values()) == trainable


def test_blip_base_adapter_file_is_under_0_9_mb(tmp_path):
    from transformers import BlipConfig

    torch.manual_seed(0)
    model = get_peft_model(BlipForImageTextRetrieval(BlipConfig()), AuroraConfig(rank=128))
    model.save_pretrained(tmp_path)

    size = (tmp_path / WEIGHTS).stat().st_size
    assert 4 * 210_560 <= size < 0.9e6


def test_fresh_process_loads_identical_outputs(tiny_retrieval, retrieval_inputs, tmp_path):
    model = save_trained_adapter(tiny_retrieval, tmp_path, rank=4)
    expected = model(**retrieval_inputs).itm_score.detach()
    torch.save({"inputs": retrieval_inputs, "expected": expected}, tmp_path / "check.pt")

    script = textwrap.dedent(
        f"""
        import torch
        import peft_cp
        from peft import PeftModel
        from transformers import BlipForImageTextRetrieval
        from peft_cp.blip.configs import small_blip_config

        torch.manual_seed(0)
        base = BlipForImageTextRetrieval(small_blip_config()).eval()
        model = PeftModel.from_pretrained(base, {str(tmp_path)!r})
        check = torch.load({str(tmp_path / "check.pt")!r}, weights_only=True)
        got = model(**check["inputs"]).itm_score
        torch.testing.assert_close(got, check["expected"], rtol=0, atol=0)
        print("identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("identical")


def test_loading_without_import_names_the_package(tiny_retrieval, tmp_path):
    save_trained_adapter(tiny_retrieval, tmp_path, rank=4)
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    assert result.returncode != 0
    assert "import peft_cp" in result.stderr.strip().splitlines()[-1]


def test_load_adapter_adds_a_named_adapter(tiny_retrieval, retrieval_inputs, clone, tmp_path):
    trained = save_trained_adapter(clone(tiny_retrieval), tmp_path, rank=4)
    model = get_peft_model(tiny_retrieval, AuroraConfig(rank=2))

    model.load_adapter(str(tmp_path), adapter_name="loaded")
    model.set_adapter("loaded")

    torch.testing.assert_close(
        model(**retrieval_inputs).itm_score, trained(**retrieval_inputs).itm_score
    )


def test_low_cpu_mem_usage_loading(tiny_retrieval, retrieval_inputs, clone, tmp_path):
    trained = save_trained_adapter(clone(tiny_retrieval), tmp_path, rank=4)

    model = PeftModel.from_pretrained(tiny_retrieval, tmp_path, low_cpu_mem_usage=True)

    assert not model.base_model.factor_store().P.is_meta
    torch.testing.assert_close(
        model(**retrieval_inputs).itm_score, trained(**retrieval_inputs).itm_score
    )


def assert_untouched(model):
    assert not any(isinstance(m, AuroraLayer) for m in model.modules())
    assert not hasattr(model, "peft_config")


def test_rank_mismatch_fails_before_touching_the_model(tiny_retrieval, clone, tmp_path):
    save_trained_adapter(clone(tiny_retrieval), tmp_path, rank=4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    with pytest.raises(
        ValueError, match=r"U_32' of shape \(32, 4\), but this model needs \(32, 8\) \(rank 8"
    ):
        PeftModel.from_pretrained(tiny_retrieval, tmp_path)
    assert_untouched(tiny_retrieval)


def test_other_model_fails_before_touching_it(tiny_retrieval, tmp_path):
    save_trained_adapter(tiny_retrieval, tmp_path, rank=4)
    torch.manual_seed(0)
    other = BlipForImageTextRetrieval(small_blip_config(num_layers=1)).eval()

    with pytest.raises(ValueError, match=r"adapter file has 'base_model.aurora_store.P' of shape"):
        PeftModel.from_pretrained(other, tmp_path)
    assert_untouched(other)


@pytest.mark.parametrize("keep_bytes", [4, 100, -10])
def test_truncated_file_fails_before_touching_the_model(
    tiny_retrieval, clone, tmp_path, keep_bytes
):
    save_trained_adapter(clone(tiny_retrieval), tmp_path, rank=4)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[:keep_bytes])

    with pytest.raises(ValueError, match=rf"{WEIGHTS}: (not a safetensors file|truncated)"):
        PeftModel.from_pretrained(tiny_retrieval, tmp_path)
    assert_untouched(tiny_retrieval)


def test_missing_factor_is_reported(tiny_retrieval, clone, tmp_path):
    save_trained_adapter(clone(tiny_retrieval), tmp_path, rank=4)
    tensors = load_file(tmp_path / WEIGHTS)
    del tensors["base_model.aurora_store.lam"]
    save_file(tensors, tmp_path / WEIGHTS)

    with pytest.raises(ValueError, match=r"has no 'base_model.aurora_store.lam'"):
        PeftModel.from_pretrained(tiny_retrieval, tmp_path)
    assert_untouched(tiny_retrieval)


def test_save_adapter_swaps_in_a_complete_adapter(tiny_retrieval, tmp_path):
    model = save_trained_adapter(tiny_retrieval, tmp_path / "first", rank=4)
    folder = tmp_path / "adapter"
    peft_cp.save_adapter(model, folder)
    first = (folder / WEIGHTS).read_bytes()

    with torch.no_grad():
        model.base_model.factor_store().lam.add_(1.0)
    assert peft_cp.save_adapter(model, folder) == folder

    assert (folder / WEIGHTS).read_bytes() != first
    saved = load_file(folder / WEIGHTS)["base_model.aurora_store.lam"]
    torch.testing.assert_close(saved, model.base_model.factor_store().lam.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "first"]  # nothing left over


def test_save_adapter_interrupted_keeps_the_previous_adapter(tiny_retrieval, tmp_path, monkeypatch):
    model = save_trained_adapter(tiny_retrieval, tmp_path / "first", rank=4)
    folder = tmp_path / "adapter"
    peft_cp.save_adapter(model, folder)
    before = (folder / WEIGHTS).read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 10)  # half a file, then the disk is full
        raise OSError("No space left on device")

    monkeypatch.setattr("peft.peft_model.safe_save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        peft_cp.save_adapter(model, folder)

    assert (folder / WEIGHTS).read_bytes() == before
    load_file(folder / WEIGHTS)  # still a valid file
