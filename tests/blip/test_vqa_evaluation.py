import json

import pytest
import torch
from accelerate import Accelerator
from transformers import BlipForQuestionAnswering

from peft_cp.blip.configs import small_blip_config
from peft_cp.blip.data import QAItem, VQATestDataset, read_answer_list
from peft_cp.blip.demo_vqa import build_demo_tokenizer, write_demo_video_qa, write_demo_vqa
from peft_cp.blip.video import ImageLoader, ImageTransform, VideoLoader
from peft_cp.blip.vqa import (
    answer_accuracy,
    answer_questions,
    generate_answers,
    majority_answer,
    rank_answers,
    read_reference_answers,
    reference_answers,
    sample_qa_cases,
    tokenize,
)

IMAGE = 32


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    files = write_demo_vqa(tmp_path_factory.mktemp("vqa"), num_train_images=4, num_test_images=5)
    loader = ImageLoader(ImageTransform(IMAGE))
    test_set = VQATestDataset(files.test_file, files.media_root, loader, benchmark="vqav2")
    return files, test_set


@pytest.fixture(scope="module")
def demo_model():
    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    config = small_blip_config(vision_width=32, text_width=32, vocab_size=len(tokenizer))
    return BlipForQuestionAnswering(config).eval(), tokenizer


@pytest.mark.parametrize("batch_size", [1, 4])
def test_answer_questions_ranks_each_question_as_rank_answers_does(
    demo_images, demo_model, batch_size
):
    files, test_set = demo_images
    model, tokenizer = demo_model
    candidates = read_answer_list(files.answer_list_file)

    answers = answer_questions(
        model, test_set, tokenizer, Accelerator(cpu=True), candidates, batch_size=batch_size, k=4
    )

    answer_ids, answer_mask = tokenize(tokenizer, candidates, 10)
    expected = {}
    for index in range(len(test_set)):
        sample = test_set[index]
        question_ids, question_mask = tokenize(tokenizer, [sample["question"]], 35)
        best = rank_answers(
            model,
            sample["pixel_values"][None],
            question_ids,
            question_mask,
            answer_ids,
            answer_mask,
            k=4,
        )
        expected[sample["question_id"]] = candidates[best.item()]
    assert answers == expected


def test_answer_questions_generates_without_candidates(tmp_path, demo_model):
    files = write_demo_video_qa(tmp_path, num_train_videos=1, num_test_videos=2, num_frames=4)
    loader = VideoLoader(2, IMAGE, mode="uniform")
    test_set = VQATestDataset(files.test_file, files.media_root, loader, benchmark="msrvtt_qa")
    model, tokenizer = demo_model

    answers = answer_questions(model, test_set, tokenizer, Accelerator(cpu=True), batch_size=3)

    expected = {}
    for index in range(len(test_set)):
        sample = test_set[index]
        question_ids, question_mask = tokenize(tokenizer, [sample["question"]], 35)
        (text,) = generate_answers(
            model, sample["pixel_values"][None], question_ids, question_mask, tokenizer, 10
        )
        expected[sample["question_id"]] = text
    assert answers == expected


def test_reference_answers_come_from_the_file_or_the_test_items(tmp_path, demo_images):
    files, test_set = demo_images
    video_files = write_demo_video_qa(tmp_path, num_train_videos=1, num_test_videos=1)
    loader = VideoLoader(2, IMAGE, mode="uniform")
    videos = VQATestDataset(
        video_files.test_file, video_files.media_root, loader, benchmark="msrvtt_qa"
    )

    images = reference_answers(test_set, files.test_answers_file)

    stored = json.loads(files.test_answers_file.read_text())
    assert images == {int(qid): answers for qid, answers in stored.items()}
    assert reference_answers(test_set) is None  # VQAv2 test questions carry no answers
    assert reference_answers(videos) == {
        item.question_id: [item.answers[0]] for item in videos.items
    }


def test_missing_reference_answers_are_named(tmp_path):
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"1": ["yes"], "2": ["no"]}))

    assert read_reference_answers(path, [2, 1]) == {2: ["no"], 1: ["yes"]}
    with pytest.raises(
        ValueError,
        match=r"answers\.json: no reference answers for 7 of 9 .* 3, 4, 5, 6, 7 and 2 more",
    ):
        read_reference_answers(path, range(1, 10))
    path.write_text(json.dumps([["yes"]]))
    with pytest.raises(ValueError, match=r"answers\.json: expected a JSON object .* got a list"):
        read_reference_answers(path, [1])
    path.write_text(json.dumps({"1": "yes"}))
    with pytest.raises(ValueError, match=r"question_id 1 must map to a non-empty list .* 'yes'"):
        read_reference_answers(path, [1])


def test_majority_answer_sums_the_weights():
    items = [
        QAItem("a.jpg", "q", ("red", "blue"), (0.6, 0.4)),
        QAItem("b.jpg", "q", ("blue",), (0.3,)),
    ]

    assert majority_answer(items) == "blue"  # blue 0.7, red 0.6: not the most frequent winner
    assert majority_answer([*items, QAItem("c.jpg", "q", ("red",), (0.2,))]) == "red"  # 0.8
    with pytest.raises(ValueError, match="majority_answer: `items` hold no answers"):
        majority_answer([QAItem("d.jpg", "q")])


def test_answer_accuracy_by_benchmark():
    predictions = {1: "two", 2: "Red "}
    references = {1: ["2"] * 3 + ["3"] * 7, 2: ["red"] * 10}

    # VQAv2: "two" normalises to "2", three matches of ten give 100% on every leave-one-out
    # subset but those that drop one of the three (3 of 10 subsets: 2 / 3).
    expected_first = 100 * (7 * 1.0 + 3 * (2 / 3)) / 10
    assert answer_accuracy(predictions, references, "vqav2") == pytest.approx(
        (expected_first + 100.0) / 2
    )
    assert answer_accuracy({1: "red", 2: "blue"}, {1: ["red"], 2: ["red"]}, "msrvtt_qa") == 50.0
    with pytest.raises(ValueError, match="benchmark must be 'vqav2' or 'msrvtt_qa', got 'gqa'"):
        answer_accuracy(predictions, references, "gqa")


@pytest.mark.parametrize(("count", "indices"), [(3, [0, 4, 7]), (1, [0]), (20, list(range(8)))])
def test_sample_qa_cases_spreads_over_the_set(demo_images, count, indices):
    _, test_set = demo_images
    assert len(test_set) == 8  # first, last and evenly spaced between (7 / 2 rounds to 4)
    predictions = {item.question_id: f"answer {item.question_id}" for item in test_set.items}
    references = {item.question_id: ["red", "blue"] for item in test_set.items}

    cases = sample_qa_cases(test_set, predictions, references, count)

    items = [test_set.items[i] for i in indices]
    assert [case.media for case in cases] == [test_set.media_root / item.media for item in items]
    assert [case.prediction for case in cases] == [predictions[i.question_id] for i in items]
    assert all(case.references == ["red", "blue"] for case in cases)
    assert sample_qa_cases(test_set, predictions, references, 0) == []
