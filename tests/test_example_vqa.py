import importlib.util
import json
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from accelerate import Accelerator
from peft import PeftModel
from transformers import BlipForQuestionAnswering

from peft_cp.blip.data import VQATestDataset, read_answer_list
from peft_cp.blip.demo_vqa import build_demo_tokenizer, demo_vqa_files
from peft_cp.blip.gated_query import add_gated_query
from peft_cp.blip.video import ImageLoader, ImageTransform
from peft_cp.blip.vqa import answer_accuracy, answer_questions, reference_answers

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vqa.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("example_vqa", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CasePage(HTMLParser):
    """Counts the case sections and the media of a `write_qa_cases_html` page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cases = self.images = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        self.cases += tag == "section" and "case" in classes
        self.images += tag == "img"


@pytest.mark.slow
def test_vqa_demo_runs_end_to_end(tmp_path):
    example = _load_example()

    reports = example.main(["--quick", "--cases", "5", "--output-dir", str(tmp_path)])

    assert [report["dataset"] for report in reports] == ["vqav2 (demo)", "msrvtt_qa (demo)"]
    for report in reports:
        folder = tmp_path / report["dataset"].split()[0]
        written = json.loads((folder / "results.json").read_text())
        assert written["task"] == "vqa" and written["method"] == "Aurora r=16"
        assert isinstance(written["trainable_params"], int) and written["trainable_params"] > 0
        assert 0.0 <= written["metrics"]["accuracy"] <= 100.0
        assert "accuracy" in written["majority_baseline"]
        assert written["epoch_chosen_by"] == "last epoch"
        assert (folder / "adapter" / "adapter_config.json").is_file()
        assert (folder / "base_model" / "config.json").is_file()
        page = CasePage((folder / "cases.html").read_text())
        assert page.cases == 5 and page.images >= 5  # a video case shows a strip of frames

    # The saved adapter loads back onto the saved random base (gates added first, as documented)
    # and reproduces the accuracy the results file reports.
    base = BlipForQuestionAnswering.from_pretrained(tmp_path / "vqav2" / "base_model")
    add_gated_query(base)
    model = PeftModel.from_pretrained(base, tmp_path / "vqav2" / "adapter")
    files = demo_vqa_files(tmp_path / "data" / "vqav2")
    loader = ImageLoader(ImageTransform(32))
    test_set = VQATestDataset(files.test_file, files.media_root, loader, benchmark="vqav2")
    predictions = answer_questions(
        model,
        test_set,
        build_demo_tokenizer(),
        Accelerator(cpu=True),
        read_answer_list(files.answer_list_file),
    )
    truth = reference_answers(test_set, files.test_answers_file)
    accuracy = answer_accuracy(predictions, truth, "vqav2")
    assert accuracy == pytest.approx(reports[0]["metrics"]["accuracy"])

    submission = json.loads((tmp_path / "vqav2" / "vqa_submission.json").read_text())
    assert {entry["question_id"]: entry["answer"] for entry in submission} == predictions


@pytest.mark.slow
def test_two_process_demo_answers_every_question_once(tmp_path, launch_two_processes):
    command = [*launch_two_processes, str(EXAMPLE), "--quick", "--output-dir", str(tmp_path)]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}  # one gloo group, not 2 alone

    run = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)

    assert run.returncode == 0, run.stderr[-3000:]
    # The test questions are split over the processes, one more on one of them; the answers
    # gathered back hold each question once.
    questions = json.loads((tmp_path / "data" / "vqav2" / "vqa_test.json").read_text())
    assert len(questions) % 2 == 1
    submission = json.loads((tmp_path / "vqav2" / "vqa_submission.json").read_text())
    assert sorted(entry["question_id"] for entry in submission) == sorted(
        question["question_id"] for question in questions
    )
    assert (tmp_path / "msrvtt_qa" / "results.json").is_file()
    assert "outlive the process group" not in run.stderr  # both processes left it cleanly


@pytest.mark.slow
def test_vqa_demo_beats_the_majority_answer(tmp_path):
    # 8 of the demo's 15 epochs: ~40 s on 2 CPU cores for both tasks, still well clear of the
    # baseline (images: about 68% against 22%; videos: about 39% against 11%).
    example = _load_example()

    images, videos = example.main(["--epochs", "8", "--cases", "0", "--output-dir", str(tmp_path)])

    for report, margin in ((images, 25.0), (videos, 15.0)):
        after = report["metrics"]["accuracy"]
        assert after > report["majority_baseline"]["accuracy"] + margin, report
        assert after > report["before_training"]["accuracy"] + margin, report
    assert not (tmp_path / "vqav2" / "cases.html").exists()  # --cases 0


def test_benchmark_run_names_missing_arguments(capsys):
    example = _load_example()

    with pytest.raises(SystemExit):
        example.parse_args(["--model", "Salesforce/blip-vqa-base", "--dataset", "vqav2"])

    error = capsys.readouterr().err
    assert "--train-file, --test-file, --media-root, --answer-list" in error


def test_a_missing_model_folder_is_named(capsys, tmp_path):
    example = _load_example()
    argv = ["--model", str(tmp_path / "no_such_model"), "--dataset", "msrvtt_qa"]
    argv += ["--train-file", "train.jsonl", "--test-file", "test.jsonl", "--media-root", "."]

    with pytest.raises(SystemExit):
        example.parse_args(argv)

    error = capsys.readouterr().err
    assert f"--model '{tmp_path / 'no_such_model'}': no such file or folder" in error


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


def test_validation_file_of_vqav2_needs_its_answers(capsys):
    example = _load_example()
    common = ["--model", "m", "--train-file", "t", "--test-file", "s", "--media-root", "r"]

    with pytest.raises(SystemExit):
        example.parse_args([*common, "--dataset", "vqav2", "--answer-list", "a", "--val-file", "v"])

    assert "a benchmark run needs --val-answers" in capsys.readouterr().err


def test_visual_genome_weight_and_case_count_options():
    example = _load_example()
    common = ["--model", "m", "--train-file", "t", "--test-file", "s", "--media-root", "r"]
    common += ["--dataset", "vqav2", "--answer-list", "a"]

    default = example.parse_args(common)
    chosen = example.parse_args([*common, "--vg-answer-weight", "0.5", "--cases", "0"])

    assert (default.vg_answer_weight, default.cases) == (0.2, 12)  # BLIP's Visual Genome weight
    assert (chosen.vg_answer_weight, chosen.cases) == (0.5, 0)


def test_gradient_accumulation_option():
    example = _load_example()
    common = ["--model", "m", "--train-file", "t", "--test-file", "s", "--media-root", "r"]
    common += ["--dataset", "msrvtt_qa"]

    assert example.parse_args(common).gradient_accumulation_steps == 1
    chosen = example.parse_args([*common, "--gradient-accumulation-steps", "4"])
    assert chosen.gradient_accumulation_steps == 4
