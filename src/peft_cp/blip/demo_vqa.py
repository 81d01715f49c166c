"""Synthetic question-answering data for offline demos and tests, written in the real file formats.

Two deterministic datasets, each built in about a second:

- VQAv2-style images (`write_demo_vqa`): coloured shapes on light backgrounds, with the questions
  "what color is the <shape>?", "what shape is in the image?" and "how many circles are there?".
  Each question has several simulated human answers (most annotators right, a few wrong), so the
  answer weights and the VQA accuracy behave as on VQAv2.
- MSRVTT-QA-style videos (`write_demo_video_qa`): short MP4 clips of a shape sliding across the
  frame, with "what color is the moving shape?" and "what shape is moving?".

Both come with a word-level tokenizer over the demo vocabulary (`build_demo_tokenizer`), with the
special-token ids a small `small_blip_config` expects: ``[PAD]`` = 0, ``[CLS]`` = 1 (BLIP's
``bos_token_id``, the decoder start token), ``[SEP]`` = 2, ``[UNK]`` = 3.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerFast

from peft_cp.blip.demo import word_tokenizer

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 30),
    "purple": (150, 60, 190),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
COUNTS: tuple[str, ...] = ("1", "2", "3")

IMAGE_QUESTIONS = {
    "color": "What color is the {shape}?",
    "shape": "What shape is in the image?",
    "count": "How many circles are there?",
}
VIDEO_QUESTIONS = {
    "color": "What color is the moving shape?",
    "shape": "What shape is moving?",
}

# Share of simulated annotators who give the right answer; the others pick a wrong one of the
# same kind, as real annotators disagree on colour shades or counts.
_ANNOTATOR_ACCURACY = 0.85


@dataclass(frozen=True)
class DemoFiles:
    """Where a demo dataset was written.

    Attributes:
        train_file, test_file: Annotations in the benchmark's format (VQAv2 JSON lists or
            MSRVTT-QA JSON-lines).
        media_root: Folder the annotation paths are relative to.
        answer_list_file: JSON list of candidate answers (VQAv2 only).
        test_answers_file: JSON object {question_id: [human answers]} for the test questions
            (VQAv2 only; MSRVTT-QA keeps its answer in the test file).
    """

    root: Path
    train_file: Path
    test_file: Path
    media_root: Path
    answer_list_file: Path | None = None
    test_answers_file: Path | None = None


def demo_vocabulary() -> list[str]:
    """Every word of the demo questions and answers, in a fixed order (special tokens excluded)."""
    words: list[str] = []
    texts = [*IMAGE_QUESTIONS.values(), *VIDEO_QUESTIONS.values()]
    texts += [IMAGE_QUESTIONS["color"].format(shape=shape) for shape in SHAPES]
    for text in texts:
        for word in text.lower().replace("?", " ?").split():
            if "{" not in word and word not in words:
                words.append(word)
    for word in [*COLORS, *SHAPES, *COUNTS]:
        if word not in words:
            words.append(word)
    return words


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of the demo vocabulary (`peft_cp.blip.demo.word_tokenizer`).

    ``[PAD]`` = 0, ``[CLS]`` = 1, ``[SEP]`` = 2, ``[UNK]`` = 3; texts become ``[CLS] words [SEP]``.
    Questions and answers must be lower case, as `clean_question` and the demo answers are.
    """
    return word_tokenizer(demo_vocabulary())


def demo_vqa_files(root: str | Path) -> DemoFiles:
    """Where `write_demo_vqa(root)` writes (or wrote) its files; nothing is read or written."""
    root = Path(root)
    return DemoFiles(
        root=root,
        train_file=root / "vqa_train.json",
        test_file=root / "vqa_test.json",
        media_root=root / "images",
        answer_list_file=root / "answer_list.json",
        test_answers_file=root / "vqa_test_answers.json",
    )


def demo_video_qa_files(root: str | Path) -> DemoFiles:
    """Where `write_demo_video_qa(root)` writes (or wrote) its files; nothing is touched."""
    root = Path(root)
    return DemoFiles(
        root=root,
        train_file=root / "msrvtt_qa_train.jsonl",
        test_file=root / "msrvtt_qa_test.jsonl",
        media_root=root / "videos",
    )


# ---------------------------------------------------------------------------------------------
# Drawing


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(185, 250) for _ in range(3))


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, color: tuple[int, int, int], box: Sequence[float]
) -> None:
    left, top, right, bottom = box
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=color)


def _single_shape_image(rng: random.Random, size: int, shape: str, color: str) -> Image.Image:
    image = Image.new("RGB", (size, size), _background(rng))
    side = rng.uniform(0.4, 0.6) * size
    left, top = rng.uniform(0, size - side), rng.uniform(0, size - side)
    _draw_shape(ImageDraw.Draw(image), shape, COLORS[color], (left, top, left + side, top + side))
    return image


def _circles_image(rng: random.Random, size: int, count: int, color: str) -> Image.Image:
    image = Image.new("RGB", (size, size), _background(rng))
    draw = ImageDraw.Draw(image)
    # One circle per cell of a 2 x 2 grid keeps them apart at any image size.
    cell = size / 2
    diameter = 0.6 * cell
    for slot in rng.sample(range(4), count):
        left = (slot % 2) * cell + rng.uniform(0, cell - diameter)
        top = (slot // 2) * cell + rng.uniform(0, cell - diameter)
        draw.ellipse((left, top, left + diameter, top + diameter), fill=COLORS[color])
    return image


def _human_answers(rng: random.Random, truth: str, choices: Sequence[str], n: int) -> list[str]:
    wrong = [choice for choice in choices if choice != truth]
    return [truth if rng.random() < _ANNOTATOR_ACCURACY else rng.choice(wrong) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# VQAv2-style images


def write_demo_vqa(
    root: str | Path,
    num_train_images: int = 400,
    num_test_images: int = 100,
    image_size: int = 32,
    seed: int = 0,
) -> DemoFiles:
    """Write a synthetic VQAv2-style dataset under `root` and return where its files are.

    Two thirds of the images show one shape and get a colour and a shape question; the others
    show one to three circles and get a counting question. Training questions have 3-10 human
    answers, test questions 10, as on VQAv2. Rerunning with the same arguments rewrites the same
    files.
    """
    root = Path(root)
    media_root = demo_vqa_files(root).media_root
    media_root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    train, test, test_answers = [], [], {}
    question_id = 0
    for index in range(num_train_images + num_test_images):
        is_test = index >= num_train_images
        name = f"{'test' if is_test else 'train'}_{index:05d}.png"
        color = rng.choice(list(COLORS))

        if rng.random() < 2 / 3:
            shape = rng.choice(SHAPES)
            image = _single_shape_image(rng, image_size, shape, color)
            questions = [
                (IMAGE_QUESTIONS["color"].format(shape=shape), color, list(COLORS)),
                (IMAGE_QUESTIONS["shape"], shape, SHAPES),
            ]
        else:
            count = rng.randint(1, len(COUNTS))
            image = _circles_image(rng, image_size, count, color)
            questions = [(IMAGE_QUESTIONS["count"], str(count), COUNTS)]
        image.save(media_root / name)

        for question, truth, choices in questions:
            question_id += 1
            if is_test:
                test.append({"question_id": question_id, "question": question, "image": name})
                test_answers[str(question_id)] = _human_answers(rng, truth, choices, 10)
            else:
                answers = _human_answers(rng, truth, choices, rng.randint(3, 10))
                train.append(
                    {
                        "question_id": question_id,
                        "question": question,
                        "image": name,
                        "answer": answers,
                        "dataset": "vqa",
                    }
                )

    files = demo_vqa_files(root)
    _write_json(files.train_file, train)
    _write_json(files.test_file, test)
    _write_json(files.answer_list_file, [*COLORS, *SHAPES, *COUNTS])
    _write_json(files.test_answers_file, test_answers)
    return files


# ---------------------------------------------------------------------------------------------
# MSRVTT-QA-style videos


def write_demo_video_qa(
    root: str | Path,
    num_train_videos: int = 120,
    num_test_videos: int = 40,
    size: int = 32,
    num_frames: int = 8,
    seed: int = 0,
) -> DemoFiles:
    """Write synthetic MSRVTT-QA-style clips and JSON-lines annotations under `root`.

    Each clip (``videos/video<i>.mp4``, H.264, `num_frames` frames of `size` x `size`) shows one
    shape of one colour sliding across a light background; it gets a colour and a shape question,
    each with a single answer, as MSRVTT-QA has.
    """
    if size % 2:
        raise ValueError(f"size must be even (H.264 with 4:2:0 chroma), got {size}.")
    root = Path(root)
    media_root = demo_video_qa_files(root).media_root
    media_root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    splits: dict[str, list[dict]] = {"train": [], "test": []}
    question_id = 0
    for video in range(num_train_videos + num_test_videos):
        split = "test" if video >= num_train_videos else "train"
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        _write_clip(media_root / f"video{video}.mp4", rng, size, num_frames, shape, color)

        for question, answer in (
            (VIDEO_QUESTIONS["color"], color),
            (VIDEO_QUESTIONS["shape"], shape),
        ):
            splits[split].append(
                {
                    "video_id": f"video{video}",
                    "question": question,
                    "answer": answer,
                    "id": question_id,
                }
            )
            question_id += 1

    files = demo_video_qa_files(root)
    for path, records in ((files.train_file, splits["train"]), (files.test_file, splits["test"])):
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return files


def _write_clip(
    path: Path, rng: random.Random, size: int, num_frames: int, shape: str, color: str
) -> None:
    background = _background(rng)
    side = 0.45 * size
    top = rng.uniform(0, size - side)
    start, end = rng.uniform(0, size - side), rng.uniform(0, size - side)

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        # Lossless and single-threaded: the same arguments then write the same bytes. The lossy
        # rate control (crf) is not repeatable from one process to the next, which made the demo's
        # video accuracy vary between runs.
        stream.options = {"qp": "0", "threads": "1"}
        for step in range(num_frames):
            left = start + (end - start) * step / max(num_frames - 1, 1)
            image = Image.new("RGB", (size, size), background)
            _draw_shape(
                ImageDraw.Draw(image), shape, COLORS[color], (left, top, left + side, top + side)
            )
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
