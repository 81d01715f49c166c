"""Evaluation metrics for the BLIP recipes: retrieval recall, VQA accuracy and result files.

Retrieval follows the protocol reported by ALBEF, BLIP and UniAdapter: recall at 1, 5 and 10 in both
directions, usually on a contrastive similarity matrix whose top-k entries per query were re-scored
by the image-text matching head (`peft_cp.blip.retrieval.rerank_scores`). VQA accuracy follows the
official VQAv2 evaluation: answers are normalised (punctuation, number words, articles,
contractions) and a prediction earns min(#humans who gave it / 3, 1), averaged over the
leave-one-out subsets of the human answers.

Everything here is model-agnostic: it takes score matrices and strings, never a model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral
from typing import Any, TypeVar

import torch
from torch import Tensor

from .files import write_text_atomic

__all__ = [
    "exact_match_accuracy",
    "normalize_vqa_answer",
    "retrieval_recall",
    "topk_per_query",
    "vqa_accuracy",
    "vqa_accuracy_dataset",
    "write_retrieval_results",
    "write_vqa_submission",
]

QuestionId = TypeVar("QuestionId", bound=Hashable)


# --------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------

_RECALL_KS = (1, 5, 10)

# How many score elements `_ground_truth_ranks` compares at once. A COCO 5k split compares 5k images
# with 25k texts per direction; in one go that would build several 125M-element temporaries.
_RANK_CHUNK_ELEMENTS = 1 << 22


def retrieval_recall(
    scores_i2t: Tensor,
    scores_t2i: Tensor,
    txt2img: Sequence[int] | Tensor,
    img2txt: Sequence[Sequence[int]],
) -> dict[str, float]:
    """Recall@1/5/10 of image-text retrieval in both directions, in percent.

    Image-to-text (keys ``txt_*``, retrieving texts): an image is a hit at K when the best-ranked of
    its ground-truth texts ``img2txt[i]`` has rank < K in row ``scores_i2t[i]``. Text-to-image (keys
    ``img_*``, retrieving images): a text is a hit at K when its single image ``txt2img[t]`` has
    rank < K in row ``scores_t2i[t]``. Videos use the same function, with videos in place of images.

    Ranks are 0-based positions in a stable descending sort of the row: a higher score comes first
    and equal scores are ordered by lower candidate index. Unlike an ``argsort`` that leaves ties in
    an unspecified order, this makes the result deterministic, e.g. for the constant fill value of a
    re-ranked matrix. ``-inf`` scores are allowed; NaN scores are rejected.

    Args:
        scores_i2t: (num_images, num_texts) scores of every text for every image.
        scores_t2i: (num_texts, num_images) scores of every image for every text. It may differ from
            ``scores_i2t.T`` because re-ranked matrices are computed separately per direction.
        txt2img: (num_texts,) index of the ground-truth image of each text.
        img2txt: for each image, the indices of its ground-truth texts (at least one each). Every
            listed text must point back to that image in ``txt2img``.

    Returns:
        ``txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean`` as
        Python floats in percent; the ``*_r_mean`` entries average the three recalls of their
        direction and ``r_mean`` averages the two directions.
    """
    text_to_image = _as_index_tensor(txt2img, "txt2img")
    num_texts, num_images = len(text_to_image), len(img2txt)
    if num_texts == 0 or num_images == 0:
        raise ValueError(
            f"Retrieval needs at least one image and one text, got len(img2txt)={num_images} and "
            f"len(txt2img)={num_texts}."
        )

    out_of_range = (text_to_image < 0) | (text_to_image >= num_images)
    if out_of_range.any():
        text = int(out_of_range.nonzero()[0])
        raise ValueError(
            f"txt2img[{text}] = {int(text_to_image[text])} is not an image index in "
            f"[0, len(img2txt)={num_images})."
        )

    _check_scores(scores_i2t, "scores_i2t", (num_images, num_texts), "(num_images, num_texts)")
    _check_scores(scores_t2i, "scores_t2i", (num_texts, num_images), "(num_texts, num_images)")
    pair_image, pair_text = _ground_truth_pairs(img2txt, text_to_image)

    # Image-to-text: the best-ranked ground-truth text of an image is its highest-scoring one (the
    # lowest index among equals), so only that text needs ranking against all texts.
    device = scores_i2t.device
    image_index = torch.arange(num_images, device=device)
    best_text = _best_ground_truth(scores_i2t, pair_image.to(device), pair_text.to(device))
    text_rank = _ground_truth_ranks(scores_i2t, image_index, best_text)

    # Text-to-image: one ground-truth image per text.
    text_index = torch.arange(num_texts, device=scores_t2i.device)
    image_rank = _ground_truth_ranks(scores_t2i, text_index, text_to_image.to(scores_t2i.device))

    metrics = {}
    for prefix, ranks in (("txt", text_rank), ("img", image_rank)):
        recalls = [_percent_below(ranks, k) for k in _RECALL_KS]
        metrics.update(
            {f"{prefix}_r{k}": recall for k, recall in zip(_RECALL_KS, recalls, strict=True)}
        )
        metrics[f"{prefix}_r_mean"] = sum(recalls) / len(recalls)
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def topk_per_query(scores: Tensor, k: int = 5) -> Tensor:
    """Indices of the ``k`` highest-scoring candidates of each query (row), best first.

    Ties are ordered by lower candidate index, the same order `retrieval_recall` ranks by, so the
    first column is the candidate that counts as rank 0 there.

    Args:
        scores: (num_queries, num_candidates) scores.
        k: how many candidates to keep, 1 <= k <= num_candidates.

    Returns:
        (num_queries, k) int64 candidate indices on the device of ``scores``.
    """
    _check_matrix(scores, "scores")
    _check_k(k, scores.shape[1])

    # A stable descending sort keeps equal scores in index order; torch.topk does not promise that.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def _ground_truth_ranks(scores: Tensor, query_index: Tensor, target_index: Tensor) -> Tensor:
    """Rank of ``scores[q, t]`` within row ``q`` for each pair (q, t), ties by lower index."""
    num_candidates = scores.shape[1]
    columns = torch.arange(num_candidates, device=scores.device)
    chunk = max(1, _RANK_CHUNK_ELEMENTS // num_candidates)
    ranks = torch.empty(len(query_index), dtype=torch.long, device=scores.device)

    # Counting beats sorting here: rank = #higher scores + #equal scores at a lower index, which
    # is exactly the position in a stable descending sort.
    for start in range(0, len(query_index), chunk):
        rows = scores[query_index[start : start + chunk]]  # (chunk, num_candidates)
        target = target_index[start : start + chunk, None]  # (chunk, 1)
        target_score = rows.gather(1, target)
        higher = (rows > target_score).sum(dim=1)
        tied_before = ((rows == target_score) & (columns < target)).sum(dim=1)
        ranks[start : start + chunk] = higher + tied_before

    return ranks


def _best_ground_truth(scores: Tensor, pair_query: Tensor, pair_target: Tensor) -> Tensor:
    """Per query, its paired target of highest score (the lowest index among equal scores)."""
    num_queries = scores.shape[0]
    pair_score = scores[pair_query, pair_target]

    best_score = torch.full((num_queries,), -math.inf, dtype=scores.dtype, device=scores.device)
    best_score.scatter_reduce_(0, pair_query, pair_score, reduce="amax")

    # Every query has at least one pair, so every entry below is overwritten by a real target.
    is_best = pair_score == best_score[pair_query]
    best_target = torch.full(
        (num_queries,), scores.shape[1], dtype=torch.long, device=scores.device
    )
    best_target.scatter_reduce_(0, pair_query[is_best], pair_target[is_best], reduce="amin")
    return best_target


def _ground_truth_pairs(
    img2txt: Sequence[Sequence[int]], text_to_image: Tensor
) -> tuple[Tensor, Tensor]:
    """``img2txt`` flattened into parallel (image, text) index tensors, checked against txt2img."""
    num_texts = len(text_to_image)
    images, texts = [], []
    for image, image_texts in enumerate(img2txt):
        if len(image_texts) == 0:
            raise ValueError(f"img2txt[{image}] is empty; every image needs a ground-truth text.")
        images.extend([image] * len(image_texts))
        texts.extend(image_texts)

    pair_text = _as_index_tensor(texts, "img2txt")
    pair_image = torch.tensor(images, dtype=torch.long)

    out_of_range = (pair_text < 0) | (pair_text >= num_texts)
    if out_of_range.any():
        bad = int(pair_text[out_of_range][0])
        raise ValueError(f"img2txt holds text index {bad}, outside [0, len(txt2img)={num_texts}).")
    mismatch = text_to_image[pair_text] != pair_image
    if mismatch.any():
        image, text = int(pair_image[mismatch][0]), int(pair_text[mismatch][0])
        raise ValueError(
            f"img2txt[{image}] lists text {text}, but txt2img[{text}] = "
            f"{int(text_to_image[text])}; the two mappings must agree."
        )

    return pair_image, pair_text


def _as_index_tensor(values: Sequence[int] | Tensor, name: str) -> Tensor:
    """``values`` as a 1-D int64 tensor on the CPU, rejecting floats and booleans."""
    tensor = torch.as_tensor(values) if len(values) > 0 else torch.empty(0, dtype=torch.long)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got dtype {tensor.dtype}.")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be a flat list of indices, got shape {tuple(tensor.shape)}.")
    return tensor.long().cpu()


def _check_scores(scores: Tensor, name: str, expected: tuple[int, int], meaning: str) -> None:
    _check_matrix(scores, name)
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"{name} must have shape {meaning} = {expected} (from len(img2txt) and "
            f"len(txt2img)), got {tuple(scores.shape)}."
        )
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN scores, which cannot be ranked.")


def _check_matrix(scores: Tensor, name: str) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}.")
    if scores.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (num_queries, num_candidates), got shape {tuple(scores.shape)}."
        )


def _check_k(k: int, num_candidates: int) -> None:
    if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= num_candidates:
        raise ValueError(
            f"k must be an integer in [1, num_candidates={num_candidates}], got {k!r}."
        )


def _percent_below(ranks: Tensor, k: int) -> float:
    return 100.0 * int((ranks < k).sum()) / len(ranks)


# --------------------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------------------

# Only these characters count as punctuation in the official evaluation. The apostrophe (needed by
# contractions), the colon ("10:30"), "$", "%", "#", "&" and "*" survive; "." has a rule below.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'

# A comma between digits ("1,000") switches the whole answer to "delete punctuation" mode.
_NUMBER_COMMA = re.compile(r"\d,\d")

# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group is a negative lookahead for the
# literal text "<=" plus a digit (a typo for the lookbehind "(?<!\d)") and never fails in front of a
# period, so the rule that takes effect is: drop a period unless a digit follows ("3.5" and ".5"
# keep theirs, "yes." and "5." lose it). The official code also passes re.UNICODE as the count
# argument, capping removals at 32 per answer; we remove all, which only differs past 32 periods.
_PERIOD = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Contracted forms the official table restores. Its keys are these forms with one apostrophe left
# out ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've"), which `_CONTRACTIONS`
# below derives. Left out on purpose: the official entries with capitalised keys ("Im", "Ive",
# "Id've"), which never match because answers are lower-cased first; its identity entries ("let's",
# "she's"); and "somebody'd" -> "somebodyd", which runs backwards. Ambiguous spellings that are
# also words ("its", "well", "were", "shed", "hell") are absent from the official table too.
# fmt: off
_CONTRACTED_FORMS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "didn't", "doesn't", "don't", "hadn't",
    "hasn't", "haven't", "he'd", "he's", "how'd", "how'll", "how's", "isn't", "it'd", "it'll",
    "ma'am", "mightn't", "might've", "mustn't", "must've", "needn't", "not've", "o'clock",
    "oughtn't", "shan't", "should've", "shouldn't", "somebody'll", "somebody's", "someone'd",
    "someone'll", "someone's", "something'd", "something'll", "that's", "there'd", "there're",
    "there's", "they'd", "they'll", "they're", "they've", "'twas", "wasn't", "we've", "weren't",
    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
    "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "y'all", "you'd", "you'll", "you're", "you've",
    "couldn't've", "hadn't've", "he'd've", "it'd've", "mightn't've", "she'd've", "shouldn't've",
    "somebody'd've", "someone'd've", "something'd've", "there'd've", "they'd've", "we'd've",
    "who'd've", "wouldn't've", "you'd've", "y'all'll", "y'all'd've",
)
# fmt: on


def _without_one_apostrophe(form: str) -> list[str]:
    positions = [i for i, char in enumerate(form) if char == "'"]
    return [form[:i] + form[i + 1 :] for i in positions]


_CONTRACTIONS = {
    variant: form for form in _CONTRACTED_FORMS for variant in _without_one_apostrophe(form)
}


def normalize_vqa_answer(text: str) -> str:
    """``text`` normalised by the rules of the official VQAv2 evaluation script.

    In order:

    1. Newlines and tabs become spaces; surrounding whitespace is stripped.
    2. Punctuation (only ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``): if the answer contains a
       comma between digits ("1,000"), every punctuation character is deleted; otherwise a character
       is deleted when it appears next to a space anywhere in the answer ("left - right") and
       replaced by a space when it does not ("black-and-white" -> "black and white").
    3. A period is deleted unless a digit follows it: "yes." -> "yes", "3.5" stays.
    4. Lower case; number words "none" and "zero" .. "ten" become digits; the articles "a", "an",
       "the" are dropped; contractions written without an apostrophe are restored ("dont" ->
       "don't"); words are re-joined with single spaces.

    Two consequences of the official rules are kept on purpose so that scores match it: the comma
    rule applies to the whole answer ("1,000-2,000" -> "10002000"), and ":", "'", "$", "%", "&",
    "#" and "*" are not punctuation.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)

    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))

    return " ".join(words)


def _strip_punctuation(text: str) -> str:
    delete_all = _NUMBER_COMMA.search(text) is not None

    # Whether a mark touches a space is decided on the input, not on the partly cleaned text, as
    # in the official code; that also makes the order of the marks irrelevant.
    cleaned = text
    for mark in _PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        cleaned = cleaned.replace(mark, "" if delete_all or touches_space else " ")

    return _PERIOD.sub("", cleaned)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one predicted answer against the human answers, in [0, 1].

    acc = mean over i of min(#{j != i : a_j == p} / 3, 1), with p and a_j normalised

    Each human answer is left out in turn and the prediction scores min(matches / 3, 1) against the
    rest; the result is the mean over the leave-one-out subsets. With ten answers, 0..4 matches give
    0, 0.3, 0.6, 0.9 and 1.0. Other counts use the same formula over however many answers there are
    (with fewer than four, even a unanimous answer scores below 1).

    The official script normalises only when the humans disagree; here both sides are always
    normalised with `normalize_vqa_answer`. That can only raise a score relative to the official
    one, and only on questions whose human answers are all the same string.

    Raises:
        ValueError: if ``human_answers`` has fewer than two answers, which leave-one-out needs.
    """
    if isinstance(human_answers, str):
        raise TypeError("human_answers must be a list of answer strings, got a single string.")
    if len(human_answers) < 2:
        raise ValueError(
            f"human_answers needs at least two answers for the leave-one-out average, got "
            f"{len(human_answers)}: {list(human_answers)!r}. For one reference answer use "
            f"exact_match_accuracy."
        )

    predicted = normalize_vqa_answer(prediction)
    total_matches = sum(normalize_vqa_answer(answer) == predicted for answer in human_answers)

    # Leaving out a matching answer leaves total - 1 matches; leaving out any other leaves total.
    num_answers = len(human_answers)
    with_match_left_out = total_matches * min((total_matches - 1) / 3, 1.0)
    with_other_left_out = (num_answers - total_matches) * min(total_matches / 3, 1.0)
    return (with_match_left_out + with_other_left_out) / num_answers


def vqa_accuracy_dataset(
    predictions: Mapping[QuestionId, str], references: Mapping[QuestionId, Sequence[str]]
) -> float:
    """Mean `vqa_accuracy` over all questions, in percent.

    Args:
        predictions: predicted answer per question id.
        references: human answers per question id (normally ten).

    Raises:
        ValueError: if the two mappings do not cover the same question ids, or are empty.
    """
    _check_same_questions(predictions, references)

    total = sum(vqa_accuracy(predictions[qid], answers) for qid, answers in references.items())
    return 100.0 * total / len(references)


def exact_match_accuracy(
    predictions: Mapping[QuestionId, str], references: Mapping[QuestionId, str]
) -> float:
    """Percentage of questions whose prediction equals the reference answer.

    Both sides are only lower-cased and stripped, as in the MSRVTT-QA / MSVD-QA open-ended protocol.

    Raises:
        ValueError: if the two mappings do not cover the same question ids, or are empty.
    """
    _check_same_questions(predictions, references)

    correct = sum(
        predictions[qid].strip().lower() == answer.strip().lower()
        for qid, answer in references.items()
    )
    return 100.0 * correct / len(references)


def _check_same_questions(predictions: Mapping[Any, Any], references: Mapping[Any, Any]) -> None:
    if len(references) == 0:
        raise ValueError("references is empty; there is nothing to score.")

    missing = [qid for qid in references if qid not in predictions]
    extra = [qid for qid in predictions if qid not in references]
    if missing:
        raise ValueError(
            f"predictions lacks {len(missing)} of {len(references)} question ids in references, "
            f"e.g. {missing[:5]!r}; predict every question (check split and id type)."
        )
    if extra:
        raise ValueError(
            f"predictions has {len(extra)} question ids that are not in references, e.g. "
            f"{extra[:5]!r}; predictions and references must come from the same split."
        )


# --------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------


def write_vqa_submission(path: str | os.PathLike[str], predictions: Mapping[int, str]) -> None:
    """Write ``predictions`` as an official VQAv2 result file, atomically.

    The file is a JSON list ``[{"question_id": int, "answer": str}, ...]`` sorted by question id.
    It is written to a temporary file in the same folder and moved over ``path`` with
    ``os.replace``, so a failure at any point leaves a previous file at ``path`` untouched.
    """
    entries = []
    for qid, answer in sorted(predictions.items()):
        if isinstance(qid, bool) or not isinstance(qid, Integral):
            raise TypeError(f"question ids must be integers, got {qid!r} ({type(qid).__name__}).")
        if not isinstance(answer, str):
            raise TypeError(
                f"answer for question {qid} must be a str, got {type(answer).__name__}."
            )
        entries.append({"question_id": int(qid), "answer": answer})

    _write_json_atomic(path, entries)


def write_retrieval_results(
    path: str | os.PathLike[str], record: Mapping[str, Any], topk: Mapping[str, Any]
) -> None:
    """Write ``{**record, "topk": topk}`` as JSON to ``path``, atomically.

    `record` is the run's summary (for the examples: task, dataset, method, trainable_params and
    the recall "metrics", the fields `peft_cp.blip.plot.read_result` reads); `topk` the top
    candidates per query. Tensors anywhere inside (e.g. from `topk_per_query`) are stored as
    nested lists. Atomicity is as in `write_vqa_submission`: a failed write leaves a previous file
    at ``path`` untouched.

    Raises:
        ValueError: if `record` already has a "topk" key.
    """
    if "topk" in record:
        raise ValueError("record must not have a 'topk' key; pass the candidates as topk.")
    _write_json_atomic(path, {**record, "topk": dict(topk)})


def _write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    # Serialised before touching the disk, so the common failure (an unserialisable value) never
    # creates a file at all.
    text = json.dumps(payload, indent=2, default=_tensor_to_list) + "\n"
    write_text_atomic(path, text)


def _tensor_to_list(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
