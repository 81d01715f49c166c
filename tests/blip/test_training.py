"""The trainer: learning-rate schedule with accumulation, best-adapter saving and restoring,
checkpoints, and how distributed runs end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import BlipForImageTextRetrieval

from peft_cp import AuroraConfig
from peft_cp.blip.configs import small_blip_config
from peft_cp.blip.training import TrainingArguments, communication_threads, fit

ROOT = Path(__file__).resolve().parents[2]


def tiny_model():
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(small_blip_config(init_std=0.1))
    return get_peft_model(model, AuroraConfig(rank=4, init_weights=False))


def dataset(size):
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "pixel_values": torch.randn(3, 32, 32, generator=generator),
            "input_ids": torch.randint(3, 100, (6,), generator=generator),
        }
        for _ in range(size)
    ]


def collate(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def loss_fn(model, batch):
    return model(**batch).itm_score.square().mean()


def scores(*values):
    """An `evaluate` returning `values` in turn, one per epoch."""
    remaining = list(values)
    return lambda model: {"score": remaining.pop(0)}


def adapter_state(model):
    return {
        k: v.detach().clone()
        for k, v in get_peft_model_state_dict(model, adapter_name="default").items()
    }


@pytest.mark.parametrize(
    ("samples", "epochs", "steps_per_epoch"),
    [(8, 2, 2), (10, 1, 3)],  # 4 (5) batches of 2, an optimizer step every 2 and at the end
)
def test_cosine_reaches_zero_at_the_end_with_accumulation(
    tmp_path, monkeypatch, samples, epochs, steps_per_epoch
):
    rates = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    # The accumulation in force is the Accelerator's, whatever the arguments say (they warn).
    args = TrainingArguments(str(tmp_path), epochs=epochs, batch_size=2, learning_rate=1e-2)
    accelerator = Accelerator(gradient_accumulation_steps=2)

    result = fit(tiny_model(), dataset(samples), collate, loss_fn, args, accelerator)

    total = epochs * steps_per_epoch
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * k / total)) for k in range(total)]
    assert result.steps == total
    assert rates == pytest.approx(expected, rel=1e-6)
    last = torch.load(
        tmp_path / "checkpoints" / f"epoch_{epochs - 1}" / "scheduler.pt", weights_only=True
    )
    assert last["last_epoch"] == total
    assert last["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)


def test_accumulation_differing_from_the_accelerator_warns(tmp_path, caplog):
    args = TrainingArguments(
        str(tmp_path), batch_size=4, gradient_accumulation_steps=4, max_steps=1
    )

    with caplog.at_level("WARNING"):
        fit(tiny_model(), dataset(4), collate, loss_fn, args, Accelerator())

    assert "the Accelerator accumulates 1 batches; the Accelerator's value is used" in caplog.text


def test_restore_best_loads_the_best_epoch_back(tmp_path):
    model = tiny_model()
    args = TrainingArguments(str(tmp_path), epochs=2, batch_size=2, learning_rate=1e-2)

    result = fit(
        model,
        dataset(4),
        collate,
        loss_fn,
        args,
        Accelerator(),
        scores(1.0, 0.0),
        "score",
        restore_best=True,
    )

    assert result.best_epoch == 0
    best = load_file(tmp_path / "best_adapter" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoints" / "epoch_1" / "adapter.safetensors")
    state = adapter_state(model)
    assert state.keys() == best.keys()
    for key in best:
        torch.testing.assert_close(state[key], best[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(best[key], last[key]) for key in best)  # epoch 1 did move


def test_a_failed_best_adapter_save_keeps_the_previous_one(tmp_path, monkeypatch):
    model = tiny_model()
    save_pretrained = model.save_pretrained
    saved = []

    def fail_on_the_second_save(folder, **kwargs):
        if saved:  # half a file written, then the disk is full
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"\0" * 10)
            raise OSError("No space left on device")
        save_pretrained(folder, **kwargs)
        saved.append((Path(folder) / "adapter_model.safetensors").read_bytes())

    monkeypatch.setattr(model, "save_pretrained", fail_on_the_second_save)
    args = TrainingArguments(str(tmp_path), epochs=2, batch_size=2, learning_rate=1e-2)

    with pytest.raises(OSError, match="No space left on device"):
        fit(model, dataset(4), collate, loss_fn, args, Accelerator(), scores(0.0, 1.0), "score")

    best = tmp_path / "best_adapter"
    assert (best / "adapter_model.safetensors").read_bytes() == saved[0]
    assert (best / "adapter_config.json").is_file()
    load_file(best / "adapter_model.safetensors")  # still a valid file


class FakeDeepSpeedAccelerator(SimpleNamespace):
    """What `fit` reads of an Accelerator under DeepSpeed, up to `prepare`."""

    distributed_type = DistributedType.DEEPSPEED
    gradient_accumulation_steps = 1

    def __init__(self):
        config = {"train_micro_batch_size_per_gpu": "auto"}
        plugin = SimpleNamespace(
            deepspeed_config=config, is_auto=lambda key: config.get(key) == "auto"
        )
        super().__init__(state=SimpleNamespace(deepspeed_plugin=plugin), prepared_with=None)

    def prepare(self, *objects):
        self.prepared_with = dict(self.state.deepspeed_plugin.deepspeed_config)
        raise InterruptedError  # the rest needs DeepSpeed itself


def test_deepspeed_gets_the_micro_batch_size_before_prepare(tmp_path):
    accelerator = FakeDeepSpeedAccelerator()
    args = TrainingArguments(str(tmp_path), batch_size=6)

    with pytest.raises(InterruptedError):
        fit(tiny_model(), dataset(4), collate, loss_fn, args, accelerator)

    assert accelerator.prepared_with == {"train_micro_batch_size_per_gpu": 6}


def test_resume_is_refused_under_deepspeed(tmp_path):
    args = TrainingArguments(str(tmp_path), resume=True)

    with pytest.raises(
        NotImplementedError, match="resume is not supported yet under DeepSpeed: ZeRO shards"
    ):
        fit(tiny_model(), dataset(4), collate, loss_fn, args, FakeDeepSpeedAccelerator())


def test_a_checkpoint_from_fsdp_is_refused_without_it(tmp_path):
    fit(tiny_model(), dataset(4), collate, loss_fn, TrainingArguments(str(tmp_path)), Accelerator())
    state_file = tmp_path / "checkpoints" / "epoch_0" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["optimizer_layout"] == "per-index"
    state_file.write_text(json.dumps(state | {"optimizer_layout": "fsdp-by-name"}))

    resumed = TrainingArguments(str(tmp_path), resume=True)
    with pytest.raises(
        ValueError,
        match=r"epoch_0: its optimizer state was written whole and keyed by parameter name \(an "
        r"FSDP run\), this run needs one by parameter index",
    ):
        fit(tiny_model(), dataset(4), collate, loss_fn, resumed, Accelerator())


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_the_sharded_optimizer(tmp_path, torchrun_two_processes):
    script = ROOT / "tests" / "scripts" / "fsdp_checkpoint.py"
    result = subprocess.run(
        [*torchrun_two_processes, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    reports = json.loads((tmp_path / "report.json").read_text())
    assert len(reports) == 2
    for report in reports:
        assert report["resumed_difference"] < 1e-6  # the step after resuming is the same step
        assert report["first_step_change"] > 1e-3 and report["second_step_change"] > 1e-3
        # Without AdamW's moments the second step goes elsewhere.
        assert report["restarted_difference"] > 1e-3


@pytest.mark.parametrize("deepspeed_broken", [False, True], ids=["deepspeed", "broken_deepspeed"])
def test_launched_processes_import_deepspeed_comm_before_the_group(deepspeed_broken):
    pytest.importorskip("deepspeed")
    lines = ["import sys"]
    if deepspeed_broken:  # an install whose import fails must not stop the import of ours
        lines.append("sys.modules['deepspeed.comm'] = None")
    lines += [
        "import peft_cp.blip.training",
        "print(sys.modules.get('deepspeed.comm') is not None)",
    ]
    launched = {**os.environ, "WORLD_SIZE": "2"}

    result = subprocess.run(
        [sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, env=launched
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == str(not deepspeed_broken)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names come from /proc")
def test_communication_threads_end_with_their_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        running = communication_threads()
    finally:
        dist.destroy_process_group()

    assert "pt_gloo_runloop" in running
    assert communication_threads() == []
