"""Tests for peft_cp.blip.metrics against hand-worked numbers and brute-force references."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from peft_cp.blip import metrics
from peft_cp.blip.metrics import (
    exact_match_accuracy,
    normalize_vqa_answer,
    retrieval_recall,
    topk_per_query,
    vqa_accuracy,
    vqa_accuracy_dataset,
    write_retrieval_results,
    write_vqa_submission,
)

# --------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------

# Three images with two captions each: image i owns texts 2i and 2i + 1.
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]


def _brute_force_rank(row: list[float], target: int) -> int:
    order = sorted(range(len(row)), key=lambda c: (-row[c], c))
    return order.index(target)


def _brute_force_recall(scores_i2t, scores_t2i, txt2img, img2txt) -> dict[str, float]:
    i2t, t2i = scores_i2t.tolist(), scores_t2i.tolist()
    text_ranks = [
        min(_brute_force_rank(i2t[i], t) for t in texts) for i, texts in enumerate(img2txt)
    ]
    image_ranks = [_brute_force_rank(t2i[t], image) for t, image in enumerate(txt2img)]

    expected = {}
    for prefix, ranks in (("txt", text_ranks), ("img", image_ranks)):
        for k in (1, 5, 10):
            expected[f"{prefix}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        expected[f"{prefix}_r_mean"] = sum(expected[f"{prefix}_r{k}"] for k in (1, 5, 10)) / 3
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    return expected


def test_retrieval_recall_hand_worked() -> None:
    scores_i2t = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # order t1 t2 t3 t4 t5 t0: t1 at rank 0 -> best 0
            [0.9, 0.8, 0.7, 0.1, 0.6, 0.5],  # order t0 t1 t2 t4 t5 t3: t2 at 2, t3 at 5 -> best 2
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # all tied, index order: t4 at 4, t5 at 5 -> best 4
        ]
    )
    scores_t2i = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # ground truth 0: rank 0
            [0.3, 0.5, 0.4],  # ground truth 0: below 0.5 and 0.4 -> rank 2
            [0.2, 0.6, 0.1],  # ground truth 1: rank 0
            [0.7, 0.7, 0.1],  # ground truth 1: tied with image 0, which wins by index -> rank 1
            [0.1, 0.2, 0.3],  # ground truth 2: rank 0
            [0.4, 0.8, 0.0],  # ground truth 2: rank 2
        ]
    )

    result = retrieval_recall(scores_i2t, scores_t2i, TXT2IMG, IMG2TXT)

    # Image-to-text best ranks (0, 2, 4): R@1 = 1/3, R@5 = R@10 = 3/3.
    # Text-to-image ranks (0, 2, 0, 1, 0, 2): R@1 = 3/6, R@5 = R@10 = 6/6.
    expected = {
        "txt_r1": 100 / 3,
        "txt_r5": 100.0,
        "txt_r10": 100.0,
        "txt_r_mean": 700 / 9,
        "img_r1": 50.0,
        "img_r5": 100.0,
        "img_r10": 100.0,
        "img_r_mean": 250 / 3,
        "r_mean": (700 / 9 + 250 / 3) / 2,
    }
    assert result == pytest.approx(expected)
    assert all(type(value) is float for value in result.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_images", "captions_per_image", "chunk_elements"),
    [(1, 1, 1 << 24), (7, 3, 1), (12, 5, 17), (40, 2, 1 << 24)],
)
def test_retrieval_recall_matches_brute_force(
    monkeypatch: pytest.MonkeyPatch,
    dtype: torch.dtype,
    num_images: int,
    captions_per_image: int,
    chunk_elements: int,
) -> None:
    # Small chunks exercise the chunked ranking; integer-valued scores create many ties.
    monkeypatch.setattr(metrics, "_RANK_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(num_images * 31 + captions_per_image)
    num_texts = num_images * captions_per_image
    img2txt = [
        list(range(i * captions_per_image, (i + 1) * captions_per_image)) for i in range(num_images)
    ]
    txt2img = [t // captions_per_image for t in range(num_texts)]
    scores_i2t = torch.randint(0, 4, (num_images, num_texts), generator=generator).to(dtype)
    scores_t2i = torch.randint(0, 4, (num_texts, num_images), generator=generator).to(dtype)

    result = retrieval_recall(scores_i2t, scores_t2i, torch.tensor(txt2img), img2txt)

    assert result == pytest.approx(_brute_force_recall(scores_i2t, scores_t2i, txt2img, img2txt))


def test_retrieval_recall_uses_any_ground_truth_text_for_images() -> None:
    # Image 0's first caption is last, its second first: the image is still a hit at R@1.
    scores_i2t = torch.tensor([[0.0, 1.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.9]])
    scores_t2i = torch.zeros(4, 2)

    result = retrieval_recall(scores_i2t, scores_t2i, [0, 0, 1, 1], [[0, 1], [2, 3]])

    assert result["txt_r1"] == pytest.approx(100.0)
    # All-zero text-to-image rows: image 0 wins every tie, so only texts 0 and 1 are hits at R@1.
    assert result["img_r1"] == pytest.approx(50.0)


def test_retrieval_recall_error_paths() -> None:
    good_i2t, good_t2i = torch.zeros(3, 6), torch.zeros(6, 3)

    with pytest.raises(
        ValueError, match=r"scores_i2t must have shape .* = \(3, 6\) .*got \(3, 5\)"
    ):
        retrieval_recall(torch.zeros(3, 5), good_t2i, TXT2IMG, IMG2TXT)
    with pytest.raises(
        ValueError, match=r"scores_t2i must have shape .* = \(6, 3\) .*got \(3, 6\)"
    ):
        retrieval_recall(good_i2t, torch.zeros(3, 6), TXT2IMG, IMG2TXT)
    with pytest.raises(ValueError, match=r"scores_i2t must be 2-D .*got shape \(18,\)"):
        retrieval_recall(torch.zeros(18), good_t2i, TXT2IMG, IMG2TXT)
    with pytest.raises(TypeError, match="scores_t2i must be a torch.Tensor, got list"):
        retrieval_recall(good_i2t, good_t2i.tolist(), TXT2IMG, IMG2TXT)
    with pytest.raises(ValueError, match="scores_t2i contains NaN"):
        retrieval_recall(good_i2t, torch.full((6, 3), math.nan), TXT2IMG, IMG2TXT)
    with pytest.raises(ValueError, match=r"txt2img\[5\] = 3 is not an image index"):
        retrieval_recall(good_i2t, good_t2i, [0, 0, 1, 1, 2, 3], IMG2TXT)
    with pytest.raises(TypeError, match="txt2img must hold integer indices"):
        retrieval_recall(good_i2t, good_t2i, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0], IMG2TXT)
    with pytest.raises(ValueError, match=r"img2txt\[1\] is empty"):
        retrieval_recall(torch.zeros(3, 4), torch.zeros(4, 3), [0, 0, 2, 2], [[0, 1], [], [2, 3]])
    with pytest.raises(
        ValueError, match=r"img2txt holds text index 6, outside \[0, len\(txt2img\)"
    ):
        retrieval_recall(good_i2t, good_t2i, TXT2IMG, [[0, 1], [2, 3], [4, 6]])
    with pytest.raises(ValueError, match=r"img2txt\[1\] lists text 4, but txt2img\[4\] = 2"):
        retrieval_recall(good_i2t, good_t2i, TXT2IMG, [[0, 1], [2, 4], [4, 5]])
    with pytest.raises(ValueError, match="at least one image and one text"):
        retrieval_recall(torch.zeros(0, 0), torch.zeros(0, 0), [], [])


def test_topk_per_query_orders_ties_by_lower_index() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])

    topk = topk_per_query(scores, k=4)

    torch.testing.assert_close(topk, torch.tensor([[1, 2, 4, 3], [0, 1, 2, 3]]))
    torch.testing.assert_close(
        topk_per_query(scores), torch.tensor([[1, 2, 4, 3, 0], [0, 1, 2, 3, 4]])
    )


def test_topk_per_query_ties_on_a_large_row() -> None:
    # Long rows with many ties: an unstable sort (and torch.topk) would return tied indices out of
    # order here.
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (3, 2000), generator=generator).float()

    expected = [sorted(range(2000), key=lambda c: (-row[c], c))[:50] for row in scores.tolist()]
    torch.testing.assert_close(topk_per_query(scores, k=50), torch.tensor(expected))


@pytest.mark.parametrize("k", [0, 6, -1, 2.0, True])
def test_topk_per_query_rejects_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, num_candidates=5\], got"):
        topk_per_query(torch.zeros(2, 5), k=k)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Periods: dropped unless a digit follows.
        ("yes.", "yes"),
        ("3.5", "3.5"),
        (".5", ".5"),
        ("5.", "5"),
        ("u.s.a.", "usa"),
        # A comma between digits deletes every punctuation mark in the answer.
        ("1,000", "1000"),
        ("1,000-2,000", "10002000"),
        # Otherwise: deleted next to a space, replaced by a space elsewhere.
        ("red, white", "red white"),
        ("red,white", "red white"),
        ("black-and-white", "black and white"),
        ("left - right", "left right"),
        ("red-blue - green", "redblue green"),
        ("what?", "what"),
        ("(a) dog", "dog"),
        ("yes!!", "yes"),
        # Not punctuation in the official rules.
        ("10:30", "10:30"),
        ("$5", "$5"),
        ("50%", "50%"),
        ("don't", "don't"),
        # Number words none..ten only.
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("zero", "0"),
        ("two dogs", "2 dogs"),
        ("eleven", "eleven"),
        # Articles.
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("the cat on the mat", "cat on mat"),
        ("theater", "theater"),
        # Contractions missing their apostrophe are restored; capitalised official keys never match.
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats", "what's"),
        ("cant", "can't"),
        ("wont", "won't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("yall", "y'all"),
        ("oclock", "o'clock"),
        ("im", "im"),
        ("its", "its"),
        # Case and whitespace.
        ("  YES \n", "yes"),
        ("Red\tCar", "red car"),
        ("blue   sky", "blue sky"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("matches", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    # With m matches among 10: leaving out one of the m matches scores min((m - 1) / 3, 1), leaving
    # out one of the 10 - m others scores min(m / 3, 1). E.g. m = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["yes"] * matches + [f"other {i}" for i in range(10 - matches)]

    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides() -> None:
    answers = ["2", "Two", "two.", "3", "three", "3", "3", "4", "four", "many"]

    # "TWO" normalises to "2", as do "2", "Two" and "two."; "3." and four answers become "3".
    assert vqa_accuracy("TWO", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3.", answers) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("answers", "expected"),
    # Two answers, one match: leave out the match -> 0, leave out the other -> 1/3; mean 1/6.
    # Three identical answers: each subset has 2 matches -> 2/3.
    [(["cat", "dog"], 1 / 6), (["cat", "cat", "cat"], 2 / 3), (["cat"] * 5, 1.0)],
)
def test_vqa_accuracy_other_answer_counts(answers: list[str], expected: float) -> None:
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_error_paths() -> None:
    with pytest.raises(ValueError, match="human_answers needs at least two answers .* got 0"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="human_answers needs at least two answers .* got 1"):
        vqa_accuracy("yes", ["yes"])
    with pytest.raises(TypeError, match="human_answers must be a list of answer strings"):
        vqa_accuracy("yes", "yes")


def test_vqa_accuracy_dataset_in_percent() -> None:
    references = {
        1: ["yes"] * 3 + ["no"] * 7,  # "yes": 0.9
        2: ["red"] * 10,  # "blue": 0.0
        3: ["2"] * 4 + ["3"] * 6,  # "two": 1.0
    }
    predictions = {1: "yes", 2: "blue", 3: "two"}

    assert vqa_accuracy_dataset(predictions, references) == pytest.approx(100 * 1.9 / 3)


def test_vqa_accuracy_dataset_error_paths() -> None:
    references = {1: ["yes"] * 10, 2: ["no"] * 10}

    with pytest.raises(ValueError, match=r"predictions lacks 1 of 2 question ids .*\[2\]"):
        vqa_accuracy_dataset({1: "yes"}, references)
    with pytest.raises(ValueError, match=r"predictions lacks 2 of 2 .*\[1, 2\]"):
        vqa_accuracy_dataset({"1": "yes", "2": "no"}, references)
    with pytest.raises(ValueError, match=r"1 question ids that are not in references.*\[3\]"):
        vqa_accuracy_dataset({1: "yes", 2: "no", 3: "no"}, references)
    with pytest.raises(ValueError, match="references is empty"):
        vqa_accuracy_dataset({}, {})


def test_exact_match_accuracy() -> None:
    references = {"a": "Yes", "b": "two", "c": "red car"}
    predictions = {"a": " yes\n", "b": "2", "c": "RED CAR"}

    # "2" vs "two" is a miss: only case and surrounding whitespace are normalised.
    assert exact_match_accuracy(predictions, references) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match=r"predictions lacks 1 of 3 question ids .*\['c'\]"):
        exact_match_accuracy({"a": "yes", "b": "2"}, references)


# --------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------


def test_write_vqa_submission_format(tmp_path: Path) -> None:
    path = tmp_path / "vqa_result.json"

    write_vqa_submission(path, {262148002: "yes", 1: "2", 42: "red"})

    assert json.loads(path.read_text()) == [
        {"question_id": 1, "answer": "2"},
        {"question_id": 42, "answer": "red"},
        {"question_id": 262148002, "answer": "yes"},
    ]
    assert os.listdir(tmp_path) == ["vqa_result.json"]


def test_write_retrieval_results_converts_tensors(tmp_path: Path) -> None:
    path = tmp_path / "retrieval.json"
    topk = {"i2t": topk_per_query(torch.tensor([[0.1, 0.9, 0.5]]), k=2)}

    write_retrieval_results(path, {"task": "retrieval", "metrics": {"r_mean": 80.5}}, topk)

    assert json.loads(path.read_text()) == {
        "task": "retrieval",
        "metrics": {"r_mean": 80.5},
        "topk": {"i2t": [[1, 2]]},
    }
    with pytest.raises(ValueError, match="must not have a 'topk' key"):
        write_retrieval_results(path, {"topk": []}, topk)


def test_writers_keep_previous_file_when_serialisation_fails(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    path.write_text("previous")

    with pytest.raises(TypeError, match="not JSON serializable"):
        write_retrieval_results(path, {"r_mean": 1.0}, {"bad": object()})
    with pytest.raises(TypeError, match=r"answer for question 3 must be a str, got int"):
        write_vqa_submission(path, {3: 7})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"question ids must be integers, got '3'"):
        write_vqa_submission(path, {"3": "yes"})  # type: ignore[dict-item]

    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["result.json"]


def test_writers_remove_temporary_file_when_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "result.json"
    path.write_text("previous")

    def failing_replace(source: str, target: str) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(metrics.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        write_vqa_submission(path, {1: "yes"})

    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["result.json"]


def test_writers_require_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        write_vqa_submission(tmp_path / "missing" / "result.json", {1: "yes"})
