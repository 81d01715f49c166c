"""The retrieval example end to end: the offline demo and the real loading path."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import BlipForImageTextRetrieval

import peft_cp  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import retrieval  # noqa: E402

from peft_cp.blip.data import RetrievalEvalDataset  # noqa: E402
from peft_cp.blip.demo import demo_vocabulary, word_tokenizer, write_shapes_dataset  # noqa: E402
from peft_cp.blip.plot import read_result  # noqa: E402
from peft_cp.blip.recipe import load_recipe_adapter  # noqa: E402
from peft_cp.blip.retrieval import evaluate_retrieval  # noqa: E402


def test_short_demo_writes_results_adapter_and_cases(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        report = retrieval.main(["--epochs", "1", "--output-dir", str(tmp_path), "--cases", "3"])

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "retrieval"
    assert results["metrics"]["r_mean"] == report["metrics"]["r_mean"]
    # The file is what the cost/accuracy chart reads.
    assert read_result(tmp_path / "results.json").accuracy == report["metrics"]["r_mean"]
    assert set(results["topk"]) == {"media_to_text", "text_to_media"}
    assert len(results["topk"]["text_to_media"]["indices"]) == 24 * 3
    assert (tmp_path / "cases.html").read_text().count('class="case"') == 3
    assert report["trainable_params"] > 0
    assert results["best_epoch_picked_on"] == "test"  # no --val-file

    # The trainable count and the before/after table reach the log.
    assert f"trainable: {report['trainable_params']:,} of" in caplog.text
    after = report["metrics"]["r_mean"]
    before = report["before_training"]["r_mean"]
    assert f"r_mean      {before:>9.1f}{after:>9.1f}" in caplog.text

    # The saved adapter loads onto the saved base model (with the same added modules).
    base = BlipForImageTextRetrieval.from_pretrained(tmp_path / "base_model")
    with pytest.raises(ValueError, match=r"no module named \['itc_temperature', 'gated_query'\]"):
        PeftModel.from_pretrained(base, tmp_path / "best_adapter")
    model = load_recipe_adapter(base, tmp_path / "best_adapter")
    assert model.base_model.factor_store().rank == 16


@pytest.mark.slow
def test_two_process_demo_with_validation_file_and_accumulation(tmp_path, launch_two_processes):
    validation = write_shapes_dataset(tmp_path / "val", train_per_combination=1, seed=1)["test"]
    command = [
        *launch_two_processes,
        str(ROOT / "examples" / "retrieval.py"),
        "--epochs", "1",
        "--max-steps", "3",
        "--output-dir", str(tmp_path / "run"),
        "--cases", "0",
        # With seed 0, the first batches of 4 have longest captions of different lengths on the
        # two processes: the token ids gathered for the ITM loss must still line up.
        "--batch-size", "4",
        "--gradient-accumulation-steps", "2",
        "--val-file", str(validation),
        "--save-every-steps", "1",
    ]  # fmt: skip
    # Without GPUs, --multi_gpu starts two torchrun processes; ACCELERATE_USE_CPU makes their
    # Accelerator join one gloo process group (otherwise each trains alone).
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}

    run = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)

    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["best_epoch"] == 0 and results["best_epoch_picked_on"] == "validation"
    assert (tmp_path / "run" / "best_adapter" / "adapter_model.safetensors").is_file()
    # Checkpoints inside the epoch (written by both processes together) gave way to its end's.
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch_0"]
    assert run.stderr.count("trainable: ") == 1  # one process group: only its main process logs
    assert "outlive the process group" not in run.stderr  # both processes left it cleanly

    # The recall the two processes report, each re-ranking half of the queries, is that of the
    # saved adapter evaluated here in one process.
    args = retrieval.parse_args(["--output-dir", str(tmp_path / "run")])  # the demo's settings
    base = BlipForImageTextRetrieval.from_pretrained(tmp_path / "run" / "base_model")
    model = load_recipe_adapter(base, tmp_path / "run" / "best_adapter")
    data = tmp_path / "run" / "data"
    test_set = RetrievalEvalDataset(
        data / "test.json", data, retrieval.media_loaders(args)[1], benchmark=args.benchmark
    )
    tokenizer = word_tokenizer(demo_vocabulary())
    metrics, _ = evaluate_retrieval(
        model,
        test_set,
        tokenizer,
        args.k_test,
        torch.device("cpu"),
        max_length=args.max_text_length,
    )
    assert metrics == pytest.approx(results["metrics"], abs=1e-9)


def _demo_in_its_own_process(output_dir: Path, *options: str) -> dict:
    # A process holds one Accelerate state, so a precision other than the one the tests' process
    # started with needs its own process, as a user's run has.
    command = [sys.executable, str(ROOT / "examples" / "retrieval.py"), *options]
    subprocess.run([*command, "--output-dir", str(output_dir)], check=True, capture_output=True)
    return json.loads((output_dir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_demo_training_beats_chance_by_far(tmp_path, precision):
    # bf16: Accelerate's mixed precision, i.e. autocast over fp32 weights and factors.
    if precision == "no":
        report = retrieval.main(["--output-dir", str(tmp_path), "--cases", "0"])
    else:
        report = _demo_in_its_own_process(tmp_path, "--cases", "0", "--mixed-precision", precision)

    chance = report["chance_r1"]
    assert report["metrics"]["txt_r1"] > 4 * chance
    assert report["metrics"]["img_r1"] > 3 * chance
    assert report["metrics"]["r_mean"] > report["before_training"]["r_mean"] + 30


@pytest.mark.slow
def test_model_folder_loading_path(tmp_path):
    data = tmp_path / "data"
    files = write_shapes_dataset(data, train_per_combination=1, image_size=32)
    torch.manual_seed(0)
    config = peft_cp.blip.configs.small_blip_config(vocab_size=len(demo_vocabulary()) + 4)
    BlipForImageTextRetrieval(config).save_pretrained(tmp_path / "model")
    word_tokenizer(demo_vocabulary()).save_pretrained(tmp_path / "model")

    retrieval.main(
        [
            "--model", str(tmp_path / "model"),
            "--benchmark", "coco",
            "--train-file", str(files["train"]),
            "--test-file", str(files["test"]),
            "--media-root", str(data),
            "--output-dir", str(tmp_path / "run"),
            "--image-size", "32",
            "--rank", "4",
            "--epochs", "1",
            "--batch-size", "8",
            "--k-test", "4",
            "--num-workers", "0",
        ]
    )  # fmt: skip

    assert (tmp_path / "run" / "best_adapter" / "adapter_model.safetensors").is_file()


def test_config_file_sets_defaults_and_the_command_line_wins():
    config = str(ROOT / "examples" / "configs" / "retrieval_msrvtt.json")
    required = ["--model", "m", "--train-file", "t.jsonl", "--test-file", "s.jsonl"]
    required += ["--media-root", "videos"]

    args = retrieval.parse_args(["--config", config, *required, "--batch-size", "2"])

    assert args.benchmark == "msrvtt" and args.image_size == 224 and args.epochs == 5
    assert args.k_test == 128 and args.train_frames == 8 and args.test_frames == 16
    assert args.batch_size == 2  # the command line overrides the file
    assert args.rank == 128  # not in the file: the built-in default
    assert args.val_file is None and args.gradient_accumulation_steps == 1


def test_validation_file_and_accumulation_options():
    required = ["--model", "m", "--benchmark", "coco", "--train-file", "t.json"]
    required += ["--test-file", "test.json", "--media-root", "images"]

    args = retrieval.parse_args(
        [*required, "--val-file", "val.json", "--gradient-accumulation-steps", "4"]
    )

    assert args.val_file == "val.json" and args.test_file == "test.json"
    assert args.gradient_accumulation_steps == 4


def test_optimizer_and_precision_options():
    common = ["--model", "m", "--benchmark", "coco", "--train-file", "t", "--test-file", "s"]
    common += ["--media-root", "r"]

    default = retrieval.parse_args(common)
    chosen = retrieval.parse_args([*common, "--weight-decay", "0.1", "--mixed-precision", "bf16"])

    assert (default.weight_decay, default.mixed_precision) == (0.05, None)
    assert (chosen.weight_decay, chosen.mixed_precision) == (0.1, "bf16")


def test_processes_that_form_no_group_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it

    with pytest.raises(
        RuntimeError, match="launched as 2 processes, but Accelerate formed a group"
    ):
        retrieval.main(["--output-dir", str(tmp_path)])


def test_a_missing_model_folder_is_named(capsys, tmp_path):
    argv = ["--model", str(tmp_path / "no_such_model"), "--benchmark", "coco"]
    argv += ["--train-file", "train.json", "--test-file", "test.json", "--media-root", "."]

    with pytest.raises(SystemExit):
        retrieval.parse_args(argv)

    error = capsys.readouterr().err
    assert f"--model '{tmp_path / 'no_such_model'}': no such file or folder" in error
