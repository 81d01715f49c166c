import importlib.util
import json
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import BlipForQuestionAnswering

from peft_cp.blip.gated_query import add_gated_query

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vqa.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("example_vqa", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_vqa_demo_runs_end_to_end(tmp_path):
    example = _load_example()

    reports = example.main(["--quick", "--output-dir", str(tmp_path)])

    assert [report["dataset"] for report in reports] == ["vqav2 (demo)", "msrvtt_qa (demo)"]
    for report in reports:
        folder = tmp_path / report["dataset"].split()[0]
        written = json.loads((folder / "results.json").read_text())
        assert written["task"] == "vqa" and written["method"] == "Aurora r=16"
        assert isinstance(written["trainable_params"], int) and written["trainable_params"] > 0
        assert 0.0 <= written["metrics"]["accuracy"] <= 100.0
        assert "accuracy" in written["majority_baseline"]
        assert (folder / "adapter" / "adapter_config.json").is_file()
        assert (folder / "base_model" / "config.json").is_file()

    # The saved adapter loads back onto the saved random base (gates added first, as documented).
    base = BlipForQuestionAnswering.from_pretrained(tmp_path / "vqav2" / "base_model")
    add_gated_query(base)
    PeftModel.from_pretrained(base, tmp_path / "vqav2" / "adapter")

    submission = json.loads((tmp_path / "vqav2" / "vqa_submission.json").read_text())
    truth = json.loads((tmp_path / "data" / "vqav2" / "vqa_test_answers.json").read_text())
    assert sorted(entry["question_id"] for entry in submission) == sorted(map(int, truth))
    assert all(isinstance(entry["answer"], str) for entry in submission)


def test_benchmark_run_names_missing_arguments(capsys):
    example = _load_example()

    with pytest.raises(SystemExit):
        example.parse_args(["--model", "Salesforce/blip-vqa-base", "--dataset", "vqav2"])

    error = capsys.readouterr().err
    assert "--train-file, --test-file, --media-root, --answer-list" in error


def test_benchmark_defaults_are_the_paper_settings():
    example = _load_example()
    common = ["--model", "m", "--train-file", "t", "--test-file", "s", "--media-root", "r"]

    image = example.parse_args([*common, "--dataset", "vqav2", "--answer-list", "a"])
    video = example.parse_args([*common, "--dataset", "msrvtt_qa"])

    assert (image.image_size, image.batch_size, image.epochs, image.rank) == (480, 16, 10, 128)
    assert (video.image_size, video.batch_size, video.epochs) == (384, 4, 10)
    assert (video.train_frames, video.test_frames) == (8, 16)
    assert image.weight_decay == 0.05 and image.train_modules == []


def test_config_file_sets_defaults_and_the_command_line_wins():
    example = _load_example()
    config = str(EXAMPLE.parent / "configs" / "vqa_msrvtt_qa.json")
    required = ["--model", "m", "--train-file", "t.jsonl", "--test-file", "s.jsonl"]
    required += ["--media-root", "videos"]

    args = example.parse_args(["--config", config, *required, "--epochs", "3"])

    assert args.dataset == "msrvtt_qa" and args.batch_size == 4 and args.image_size == 384
    assert args.train_frames == 8 and args.test_frames == 16
    assert args.epochs == 3  # the command line overrides the file


def test_config_file_with_an_unknown_setting_is_refused(tmp_path):
    example = _load_example()
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"dataset": "vqav2", "epoch": 3}))

    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epoch'\]"):
        example.parse_args(["--config", str(config)])
