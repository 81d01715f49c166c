"""Tests for peft_cp.blip.data and peft_cp.blip.video on small JPEG, MP4 and annotation fixtures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image

from peft_cp.blip.data import (
    AnnotationError,
    CaptionItem,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    VQATestDataset,
    VQATrainDataset,
    answer_weights,
    clean_caption,
    clean_question,
    collate_retrieval_eval,
    collate_retrieval_train,
    collate_vqa_test,
    collate_vqa_train,
    read_answer_list,
    read_image_text_annotations,
    read_video_qa_annotations,
    read_video_text_annotations,
    read_vqa_annotations,
)
from peft_cp.blip.video import (
    BLIP_MEAN,
    BLIP_STD,
    ImageLoader,
    ImageTransform,
    MediaError,
    VideoLoader,
    load_image,
    load_video_frames,
    sample_frame_indices,
)

SIZE = 16

# --------------------------------------------------------------------------------------------------
# Fixture writers
# --------------------------------------------------------------------------------------------------


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode).save(path, "JPEG")
    return path


def write_mp4(path: Path, num_frames: int = 12, side: int = 32) -> Path:
    """Write a clip whose frame i is a horizontal gradient brightened by 15 * i."""
    ramp = np.linspace(0, 80, side, dtype=np.float32)[None, :, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        for i in range(num_frames):
            pixels = np.broadcast_to(ramp + 15 * i, (side, side, 3)).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    )
    return path


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """Reference: (..., H, W, 3) uint8 -> (..., 3, H, W) with (x / 255 - mean) / std per channel."""
    x = torch.from_numpy(pixels.astype(np.float64) / 255.0)
    x = (x - torch.tensor(BLIP_MEAN, dtype=torch.float64)) / torch.tensor(
        BLIP_STD, dtype=torch.float64
    )
    return x.movedim(-1, -3).float()


def image_loader() -> ImageLoader:
    return ImageLoader(ImageTransform(SIZE))


def video_loader() -> VideoLoader:
    return VideoLoader(num_frames=4, size=SIZE, mode="uniform")


# --------------------------------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "max_words", "expected"),
    [
        ('A man (in red) is "running"!  Fast.', 30, "a man in red is running fast"),
        ("Two dogs:play;tug~of*war #fun\n", 30, "two dogs play tug of war fun"),
        ("It's a dog's life.", 30, "it's a dog's life"),
        ("one two three four five", 3, "one two three"),
        ("  Line one.\nLine two\t\t tabs  ", 30, "line one line two tabs"),
    ],
)
def test_clean_caption(text: str, max_words: int, expected: str) -> None:
    assert clean_caption(text, max_words) == expected


@pytest.mark.parametrize(
    ("text", "max_words", "expected"),
    [
        ("What color is the man's shirt?", 50, "what color is the man's shirt?"),
        ("Is the U.S. flag (left) shown?", 50, "is the us flag left shown?"),
        ('How many "cats":  there?', 50, "how many cats there?"),
        ("A b c d e", 2, "a b"),
    ],
)
def test_clean_question(text: str, max_words: int, expected: str) -> None:
    assert clean_question(text, max_words) == expected


@pytest.mark.parametrize("max_words", [0, -1, 2.0, True])
def test_clean_rejects_bad_max_words(max_words: Any) -> None:
    with pytest.raises(ValueError, match="`max_words` must be a positive int"):
        clean_caption("a b", max_words)
    with pytest.raises(ValueError, match="`max_words` must be a positive int"):
        clean_question("a b", max_words)


# --------------------------------------------------------------------------------------------------
# Annotation readers
# --------------------------------------------------------------------------------------------------


def test_read_image_text_train_and_test(tmp_path: Path) -> None:
    train = write_json(
        tmp_path / "coco_train.json",
        [
            {"image": "val2014/a.jpg", "caption": "A cat.", "image_id": "coco_1"},
            {"image": "val2014/a.jpg", "caption": "A kitten.", "image_id": "coco_1"},
            {"image": "val2014/b.jpg", "caption": "A dog.", "image_id": 7},
        ],
    )
    test = write_json(
        tmp_path / "coco_test.json", [{"image": "val2014/c.jpg", "caption": ["One.", "Two."]}]
    )

    assert read_image_text_annotations(train, "train") == [
        CaptionItem("val2014/a.jpg", ("A cat.",), "coco_1"),
        CaptionItem("val2014/a.jpg", ("A kitten.",), "coco_1"),
        CaptionItem("val2014/b.jpg", ("A dog.",), "7"),
    ]
    assert read_image_text_annotations(test, "test") == [
        CaptionItem("val2014/c.jpg", ("One.", "Two."), "val2014/c.jpg")
    ]


@pytest.mark.parametrize(
    ("split", "entries", "match"),
    [
        (
            "train",
            [{"image": "a.jpg", "image_id": 1}],
            r"coco\.json, entry 0: field 'caption' is missing",
        ),
        (
            "train",
            [
                {"image": "a.jpg", "caption": "x", "image_id": 1},
                {"image": "b.jpg", "caption": 3, "image_id": 2},
            ],
            r"coco\.json, entry 1: field 'caption' must be a non-empty string, got 3",
        ),
        ("train", [{"image": "a.jpg", "caption": "x"}], r"entry 0: field 'image_id' is missing"),
        (
            "val",
            [{"image": "a.jpg", "caption": "only one"}],
            r"entry 0: field 'caption' must be a non-empty list",
        ),
        ("test", [["a.jpg", "x"]], r"coco\.json, entry 0: expected a JSON object, got list"),
        ("test", {"image": "a.jpg"}, r"coco\.json: expected a JSON list of entries, got a dict"),
    ],
)
def test_read_image_text_errors(tmp_path: Path, split: Any, entries: Any, match: str) -> None:
    path = write_json(tmp_path / "coco.json", entries)
    with pytest.raises(AnnotationError, match=match):
        read_image_text_annotations(path, split)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n {"image": "a.jpg",\n  "caption": ,\n}]')

    with pytest.raises(AnnotationError, match=r"broken\.json, line 3: invalid JSON"):
        read_image_text_annotations(path, "train")


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.json: annotation file does not exist"):
        read_image_text_annotations(tmp_path / "nothing.json", "train")


def test_read_video_text_lines_and_paragraphs(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "didemo.jsonl",
        [
            {"clip_name": "clip_b", "caption": "A man walks in. "},
            {"clip_name": "clip_a", "caption": "Dog runs."},
            "",
            {"clip_name": "clip_b", "caption": "He sits down."},
            {"clip_name": "clip_c.avi", "caption": ["First.", "Second."]},
        ],
    )

    assert read_video_text_annotations(path) == [
        CaptionItem("clip_b.mp4", ("A man walks in. ",), "clip_b"),
        CaptionItem("clip_a.mp4", ("Dog runs.",), "clip_a"),
        CaptionItem("clip_b.mp4", ("He sits down.",), "clip_b"),
        CaptionItem("clip_c.avi", ("First.", "Second."), "clip_c.avi"),
    ]
    assert read_video_text_annotations(path, paragraph=True) == [
        CaptionItem("clip_b.mp4", ("A man walks in. He sits down.",), "clip_b"),
        CaptionItem("clip_a.mp4", ("Dog runs.",), "clip_a"),
        CaptionItem("clip_c.avi", ("First. Second.",), "clip_c.avi"),
    ]


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ('{"clip_name": "v1", "caption": }', r"msrvtt\.jsonl, line 3: invalid JSON"),
        ('{"caption": "x"}', r"msrvtt\.jsonl, line 3: field 'clip_name' is missing"),
        (
            '{"clip_name": "v1", "caption": ""}',
            r"line 3: field 'caption' must be a non-empty string",
        ),
        (
            '{"clip_name": "v1", "caption": [1]}',
            r"line 3: field 'caption' must be a non-empty list",
        ),
    ],
)
def test_read_video_text_errors(tmp_path: Path, bad_line: str, match: str) -> None:
    good = json.dumps({"clip_name": "v0", "caption": "ok"})
    path = write_jsonl(tmp_path / "msrvtt.jsonl", [good, good, bad_line, good])

    with pytest.raises(AnnotationError, match=match):
        read_video_text_annotations(path)

    errors: list[AnnotationError] = []
    assert len(read_video_text_annotations(path, errors=errors)) == 3
    assert len(errors) == 1 and "line 3" in str(errors[0])


def test_answer_weights() -> None:
    assert answer_weights(["a", "a", "b", "b"]) == (("a", "b"), (0.5, 0.5))
    assert answer_weights(["no", "yes", "yes", "yes"]) == (("no", "yes"), (0.25, 0.75))
    with pytest.raises(ValueError, match="`answers` is empty"):
        answer_weights([])


def test_read_vqa_train_and_test(tmp_path: Path) -> None:
    train = write_json(
        tmp_path / "vqa_train.json",
        [
            {
                "question": "Q1?",
                "image": "train2014/a.jpg",
                "answer": ["a", "a", "b", "b"],
                "dataset": "vqa",
            },
            {"question": "Q2?", "image": "vg/1.jpg", "answer": "two", "dataset": "vg"},
            {"question": "Q3?", "image": "train2014/b.jpg", "answer": ["x"], "question_id": 12},
        ],
    )
    test = write_json(
        tmp_path / "vqa_test.json",
        [{"question_id": 262144000, "question": "Q?", "image": "test2015/c.jpg", "dataset": "vqa"}],
    )

    items = read_vqa_annotations(train, "train")
    assert [(i.answers, i.weights, i.source, i.question_id) for i in items] == [
        (("a", "b"), (0.5, 0.5), "vqa", None),
        (("two",), (0.2,), "vg", None),  # BLIP's weight for a Visual Genome answer
        (("x",), (1.0,), "vqa", 12),
    ]
    assert read_vqa_annotations(train, "train", vg_answer_weight=1.0)[1].weights == (1.0,)

    (item,) = read_vqa_annotations(test, "test")
    assert (item.media, item.question, item.question_id, item.answers) == (
        "test2015/c.jpg",
        "Q?",
        262144000,
        (),
    )


@pytest.mark.parametrize(
    ("split", "entry", "match"),
    [
        (
            "train",
            {"question": "Q", "image": "a.jpg", "answer": []},
            "field 'answer' must be a non-empty list",
        ),
        (
            "train",
            {"question": "Q", "image": "a.jpg", "answer": ["x"], "dataset": "gqa"},
            "field 'dataset' must be 'vqa' or 'vg'",
        ),
        (
            "train",
            {"question": "Q", "image": "a.jpg", "answer": ["x", 1]},
            "field 'answer' must be a non-empty list",
        ),
        (
            "train",
            {"question": "Q", "image": "a.jpg", "answer": ["x"], "dataset": "vg"},
            "field 'answer' must be a non-empty string",
        ),
        ("test", {"question": "Q", "image": "a.jpg"}, "field 'question_id' is missing"),
        (
            "test",
            {"question": "Q", "image": "a.jpg", "question_id": "12a"},
            "field 'question_id' must be an integer",
        ),
        ("test", {"image": "a.jpg", "question_id": 1}, "field 'question' is missing"),
    ],
)
def test_read_vqa_errors(tmp_path: Path, split: Any, entry: dict, match: str) -> None:
    good = {"question": "Q", "image": "a.jpg", "answer": ["x"], "question_id": 1}
    path = write_json(tmp_path / "vqa.json", [good, entry])

    with pytest.raises(AnnotationError, match=rf"vqa\.json, entry 1: {match}"):
        read_vqa_annotations(path, split)


@pytest.mark.parametrize("as_list", [False, True])
def test_read_video_qa(tmp_path: Path, as_list: bool) -> None:
    entries = [
        {"video_id": "video7010", "question": "what is a man doing?", "answer": "cook", "id": 5},
        {"video_id": 7011, "question": "who sings?", "answer": "woman", "id": "6"},
        {"video_id": "12", "question": "what is shown?", "answer": "car"},
    ]
    path = (write_json if as_list else write_jsonl)(tmp_path / "msrvtt_qa.json", entries)

    items = read_video_qa_annotations(path)
    assert [(i.media, i.answers, i.weights, i.question_id, i.source) for i in items] == [
        ("video7010.mp4", ("cook",), (1.0,), 5, "msrvtt_qa"),
        ("video7011.mp4", ("woman",), (1.0,), 6, "msrvtt_qa"),
        ("video12.mp4", ("car",), (1.0,), 2, "msrvtt_qa"),
    ]


def test_read_video_qa_errors(tmp_path: Path) -> None:
    good = {"video_id": 1, "question": "q", "answer": "a"}
    path = write_jsonl(
        tmp_path / "qa.jsonl", [good, {"video_id": "clip7", "question": "q", "answer": "a"}]
    )
    with pytest.raises(
        AnnotationError, match=r"qa\.jsonl, line 2: field 'video_id' must look like"
    ):
        read_video_qa_annotations(path)

    path = write_jsonl(tmp_path / "qa.jsonl", [good, good, {"video_id": 3, "question": "q"}])
    with pytest.raises(AnnotationError, match=r"qa\.jsonl, line 3: field 'answer' is missing"):
        read_video_qa_annotations(path)


def test_read_answer_list(tmp_path: Path) -> None:
    assert read_answer_list(write_json(tmp_path / "answers.json", ["yes", "no", "2"])) == [
        "yes",
        "no",
        "2",
    ]
    with pytest.raises(
        AnnotationError, match=r"answers\.json, entry 1: expected a non-empty answer"
    ):
        read_answer_list(write_json(tmp_path / "answers.json", ["yes", 2]))


# --------------------------------------------------------------------------------------------------
# Frame sampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_frames", "num_samples", "expected"),
    [
        (12, 4, [1, 4, 7, 10]),
        (8, 2, [2, 6]),
        (5, 1, [2]),
        (10, 3, [1, 5, 8]),
        (3, 8, [0, 0, 0, 1, 1, 2, 2, 2]),
    ],
)
def test_uniform_frame_indices(num_frames: int, num_samples: int, expected: list[int]) -> None:
    assert sample_frame_indices(num_frames, num_samples, "uniform") == expected


@pytest.mark.parametrize(("num_frames", "num_samples"), [(12, 4), (10, 3), (100, 8), (3, 8)])
def test_random_frame_indices_one_per_segment(num_frames: int, num_samples: int) -> None:
    seen: list[set[int]] = [set() for _ in range(num_samples)]
    for seed in range(30):
        indices = sample_frame_indices(
            num_frames, num_samples, "random", torch.Generator().manual_seed(seed)
        )
        again = sample_frame_indices(
            num_frames, num_samples, "random", torch.Generator().manual_seed(seed)
        )
        assert indices == again

        for k, index in enumerate(indices):
            start = k * num_frames // num_samples
            end = max((k + 1) * num_frames // num_samples, start + 1)
            assert start <= index < end
            seen[k].add(index)

    # Draws spread over the whole segment: every frame of a short first segment appears in 30
    # tries, and most frames of a long one.
    first_end = max(num_frames // num_samples, 1)
    if first_end <= 4:
        assert seen[0] == set(range(first_end))
    else:
        assert len(seen[0]) > first_end // 2


def test_frame_indices_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`num_frames_in_video` must be >= 1, got 0"):
        sample_frame_indices(0, 4, "uniform")
    with pytest.raises(ValueError, match="`num_samples` must be >= 1, got 0"):
        sample_frame_indices(4, 0, "uniform")
    with pytest.raises(ValueError, match="`mode` must be 'random' or 'uniform', got 'middle'"):
        sample_frame_indices(4, 2, "middle")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def test_load_image_converts_to_rgb(tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "gray.jpg", seed=0, mode="L")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"absent\.jpg: image file does not exist"):
        load_image(tmp_path / "absent.jpg")

    (tmp_path / "corrupt.jpg").write_bytes(b"not an image")
    with pytest.raises(MediaError, match=r"corrupt\.jpg: cannot decode image"):
        load_image(tmp_path / "corrupt.jpg")


def test_image_transform_matches_reference(tmp_path: Path) -> None:
    image = load_image(write_jpeg(tmp_path / "a.jpg", seed=1))

    expected = normalise(np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)))
    actual = ImageTransform(SIZE)(image)

    assert actual.shape == (3, SIZE, SIZE) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_image_transform_training_augmentation(tmp_path: Path) -> None:
    image = load_image(write_jpeg(tmp_path / "a.jpg", seed=2, size=(64, 48)))

    def augment(seed: int, flip_prob: float) -> torch.Tensor:
        return ImageTransform(SIZE, train=True, flip_prob=flip_prob, seed=seed)(image)

    # Same seed, same crop; a certain flip mirrors exactly that crop.
    torch.testing.assert_close(augment(0, 0.0), augment(0, 0.0))
    torch.testing.assert_close(augment(0, 1.0), augment(0, 0.0).flip(-1))
    assert not torch.equal(augment(0, 0.0), augment(1, 0.0))
    assert not torch.equal(augment(0, 0.0), ImageTransform(SIZE)(image))
    assert augment(3, 0.5).shape == (3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "`size` must be a positive int"),
        ({"size": 8, "scale": (0.0, 1.0)}, "`scale` must satisfy"),
        ({"size": 8, "flip_prob": 1.5}, "`flip_prob` must be in"),
        ({"size": 8, "seed": 0, "generator": torch.Generator()}, "not both"),
    ],
)
def test_image_transform_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageTransform(**kwargs)


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_load_video_frames_matches_reference(tmp_path: Path) -> None:
    path = write_mp4(tmp_path / "clip.mp4", num_frames=12)

    frames = decoded_frames(path)
    expected = normalise(
        np.stack(
            [
                np.asarray(
                    Image.fromarray(frames[i]).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
                )
                for i in (1, 4, 7, 10)
            ]
        )
    )
    actual = load_video_frames(path, 4, "uniform", SIZE)

    assert actual.shape == (4, 3, SIZE, SIZE)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_load_video_frames_random_is_seeded(tmp_path: Path) -> None:
    path = write_mp4(tmp_path / "clip.mp4", num_frames=12)

    first = load_video_frames(path, 3, "random", SIZE, torch.Generator().manual_seed(4))
    second = load_video_frames(path, 3, "random", SIZE, torch.Generator().manual_seed(4))

    torch.testing.assert_close(first, second)
    assert first.shape == (3, 3, SIZE, SIZE)


def test_short_video_repeats_frames(tmp_path: Path) -> None:
    path = write_mp4(tmp_path / "short.mp4", num_frames=3)

    frames = load_video_frames(path, 8, "uniform", SIZE)  # indices [0, 0, 0, 1, 1, 2, 2, 2]

    assert frames.shape == (8, 3, SIZE, SIZE)
    torch.testing.assert_close(frames[0], frames[2])
    torch.testing.assert_close(frames[3], frames[4])
    torch.testing.assert_close(frames[5], frames[7])
    assert not torch.equal(frames[2], frames[3])


def test_load_video_frames_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"absent\.mp4: video file does not exist"):
        load_video_frames(tmp_path / "absent.mp4", 4, "uniform", SIZE)

    (tmp_path / "corrupt.mp4").write_bytes(b"garbage" * 20)
    with pytest.raises(MediaError, match=r"corrupt\.mp4: cannot decode video"):
        load_video_frames(tmp_path / "corrupt.mp4", 4, "uniform", SIZE)

    with pytest.raises(ValueError, match="`mode` must be 'random' or 'uniform'"):
        load_video_frames(tmp_path / "absent.mp4", 4, "middle", SIZE)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Datasets and collate functions
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """Images a.jpg and b.jpg under tmp_path/images with Karpathy-style train and test files."""
    for seed, name in enumerate(["a.jpg", "b.jpg"]):
        write_jpeg(tmp_path / "images" / "val2014" / name, seed=seed)
    write_json(
        tmp_path / "train.json",
        [
            {"image": "val2014/a.jpg", "caption": "A Cat sits.", "image_id": "1"},
            {"image": "val2014/b.jpg", "caption": "A dog (brown).", "image_id": "2"},
            {"image": "val2014/a.jpg", "caption": "Kitten!", "image_id": "1"},
        ],
    )
    write_json(
        tmp_path / "test.json",
        [
            {"image": "val2014/a.jpg", "caption": ["One.", "Two."]},
            {"image": "val2014/b.jpg", "caption": ["Three.", "Four.", "Five."]},
        ],
    )
    return tmp_path


def test_retrieval_train_dataset(coco: Path) -> None:
    dataset = RetrievalTrainDataset(
        coco / "train.json", coco / "images", image_loader(), benchmark="coco"
    )

    assert len(dataset) == 3 and dataset.num_media == 2 and dataset.skipped == 0
    assert [text for _, text, _ in dataset.pairs] == ["a cat sits", "a dog brown", "kitten"]

    batch = collate_retrieval_train([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert batch["text"] == ["a cat sits", "a dog brown", "kitten"]
    torch.testing.assert_close(batch["media_index"], torch.tensor([0, 1, 0]))
    torch.testing.assert_close(batch["pixel_values"][0], batch["pixel_values"][2])


def test_retrieval_eval_dataset(coco: Path) -> None:
    dataset = RetrievalEvalDataset(
        coco / "test.json", coco / "images", image_loader(), benchmark="flickr30k"
    )

    assert dataset.media == ["val2014/a.jpg", "val2014/b.jpg"]
    assert dataset.texts == ["one", "two", "three", "four", "five"]
    assert dataset.text_to_media == [0, 0, 1, 1, 1]
    assert dataset.media_to_texts == [[0, 1], [2, 3, 4]]

    batch = collate_retrieval_eval([dataset[1], dataset[0]])
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(batch["media_index"], torch.tensor([1, 0]))


def test_video_retrieval_datasets(tmp_path: Path) -> None:
    for name in ["video1", "video2"]:
        write_mp4(tmp_path / "videos" / f"{name}.mp4", num_frames=6)
    lines = [
        {"clip_name": "video1", "caption": "Sentence one."},
        {"clip_name": "video2", "caption": "Other clip."},
        {"clip_name": "video1", "caption": "Sentence two."},
    ]
    path = write_jsonl(tmp_path / "ann.jsonl", lines)

    train = RetrievalTrainDataset(path, tmp_path / "videos", video_loader(), benchmark="msrvtt")
    assert [index for _, _, index in train.pairs] == [0, 1, 0]
    batch = collate_retrieval_train([train[0], train[1]])
    assert batch["pixel_values"].shape == (2, 4, 3, SIZE, SIZE)

    msrvtt = RetrievalEvalDataset(path, tmp_path / "videos", video_loader(), benchmark="msrvtt")
    assert msrvtt.media_to_texts == [[0, 1], [2]]

    didemo = RetrievalEvalDataset(path, tmp_path / "videos", video_loader(), benchmark="didemo")
    assert didemo.texts == ["sentence one sentence two", "other clip"]
    assert didemo.text_to_media == [0, 1]
    assert didemo[0]["pixel_values"].shape == (4, 3, SIZE, SIZE)


def test_dataset_rejects_wrong_loader(coco: Path) -> None:
    with pytest.raises(ValueError, match="`loader` must be a VideoLoader for benchmark 'msrvtt'"):
        RetrievalTrainDataset(coco / "train.json", coco, image_loader(), benchmark="msrvtt")
    with pytest.raises(ValueError, match="`benchmark` must be one of"):
        RetrievalTrainDataset(coco / "train.json", coco, image_loader(), benchmark="nocaps")  # type: ignore[arg-type]


def test_vqa_datasets(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "coco" / "a.jpg", seed=0)
    write_jpeg(tmp_path / "vg" / "v.jpg", seed=1)
    train_vqa = write_json(
        tmp_path / "vqa_train.json",
        [{"question": "What IS this?", "image": "a.jpg", "answer": ["cat", "cat", "dog", "cat"]}],
    )
    train_vg = write_json(
        tmp_path / "vg_qa.json",
        [{"question": "Where?", "image": "v.jpg", "answer": "park", "dataset": "vg"}],
    )
    test = write_json(
        tmp_path / "vqa_test.json", [{"question_id": 9, "question": "Why?", "image": "a.jpg"}]
    )

    train = VQATrainDataset(
        [train_vqa, train_vg],
        tmp_path / "coco",
        image_loader(),
        benchmark="vqav2",
        vg_root=tmp_path / "vg",
    )
    batch = collate_vqa_train([train[0], train[1]])
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["question"] == ["what is this?", "where?"]
    assert batch["answers"] == ["cat", "dog", "park"]
    torch.testing.assert_close(batch["weights"], torch.tensor([0.75, 0.25, 0.2]))
    torch.testing.assert_close(batch["answer_counts"], torch.tensor([2, 1]))

    heavier = VQATrainDataset(
        [train_vqa, train_vg],
        tmp_path / "coco",
        image_loader(),
        benchmark="vqav2",
        vg_root=tmp_path / "vg",
        vg_answer_weight=0.5,
    )
    assert heavier[1]["weights"] == [0.5] and heavier[0]["weights"] == [0.75, 0.25]

    test_set = VQATestDataset(test, tmp_path / "coco", image_loader(), benchmark="vqav2")
    batch = collate_vqa_test([test_set[0]])
    assert batch["question"] == ["why?"]
    torch.testing.assert_close(batch["question_id"], torch.tensor([9]))


def test_video_qa_datasets(tmp_path: Path) -> None:
    write_mp4(tmp_path / "videos" / "video3.mp4", num_frames=5)
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"video_id": "video3", "question": "What is moving?", "answer": "car", "id": 42}],
    )

    train = VQATrainDataset(path, tmp_path / "videos", video_loader(), benchmark="msrvtt_qa")
    sample = train[0]
    assert sample["pixel_values"].shape == (4, 3, SIZE, SIZE)
    assert (sample["answers"], sample["weights"]) == (["car"], [1.0])

    test = VQATestDataset(path, tmp_path / "videos", video_loader(), benchmark="msrvtt_qa")
    batch = collate_vqa_test([test[0]])
    assert batch["pixel_values"].shape == (1, 4, 3, SIZE, SIZE)
    torch.testing.assert_close(batch["question_id"], torch.tensor([42]))
    assert test.items[0].answers == ("car",)


# --------------------------------------------------------------------------------------------------
# skip_bad
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def coco_with_problems(coco: Path) -> Path:
    """Train file with a missing image (entries 1 and 3) and a malformed entry (entry 2)."""
    write_json(
        coco / "train_bad.json",
        [
            {"image": "val2014/a.jpg", "caption": "A cat.", "image_id": "1"},
            {"image": "val2014/gone.jpg", "caption": "Lost.", "image_id": "3"},
            {"image": "val2014/b.jpg", "image_id": "2"},
            {"image": "val2014/gone.jpg", "caption": "Lost again.", "image_id": "3"},
            {"image": "val2014/b.jpg", "caption": "A dog.", "image_id": "2"},
        ],
    )
    return coco


def test_skip_bad_counts_and_reports(
    coco_with_problems: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = coco_with_problems
    with caplog.at_level(logging.WARNING, logger="peft_cp.blip.data"):
        dataset = RetrievalTrainDataset(
            root / "train_bad.json",
            root / "images",
            image_loader(),
            benchmark="coco",
            skip_bad=True,
        )

    assert dataset.skipped == 3
    assert [text for _, text, _ in dataset.pairs] == ["a cat", "a dog"]
    assert [index for _, _, index in dataset.pairs] == [0, 1]
    (record,) = caplog.records
    assert "skipped 3 of 5 entries" in record.getMessage()
    assert "entry 2: field 'caption' is missing" in record.getMessage()
    assert "gone.jpg: media file does not exist" in record.getMessage()


def test_without_skip_bad_problems_raise(coco_with_problems: Path) -> None:
    root = coco_with_problems
    with pytest.raises(
        AnnotationError, match=r"train_bad\.json, entry 2: field 'caption' is missing"
    ):
        RetrievalTrainDataset(
            root / "train_bad.json", root / "images", image_loader(), benchmark="coco"
        )

    # A missing file is only found when the sample is loaded.
    dataset = RetrievalEvalDataset(
        root / "test.json", root / "elsewhere", image_loader(), benchmark="coco"
    )
    with pytest.raises(MediaError, match=r"elsewhere/val2014/a\.jpg: image file does not exist"):
        dataset[0]


def test_skip_bad_substitutes_undecodable_training_media(
    coco: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (coco / "images" / "val2014" / "a.jpg").write_bytes(b"truncated")

    train = RetrievalTrainDataset(
        coco / "train.json", coco / "images", image_loader(), benchmark="coco", skip_bad=True
    )
    with caplog.at_level(logging.WARNING, logger="peft_cp.blip.data"):
        sample = train[0]

    assert sample["text"] == "a dog brown" and train.load_failures == 1
    assert "a.jpg: cannot decode image" in caplog.records[0].getMessage()

    # Evaluation never substitutes: the sample would be scored against the wrong captions.
    evaluation = RetrievalEvalDataset(
        coco / "test.json", coco / "images", image_loader(), benchmark="coco", skip_bad=True
    )
    with pytest.raises(MediaError, match=r"a\.jpg: cannot decode image"):
        evaluation[0]


def test_skip_bad_video_qa(tmp_path: Path) -> None:
    write_mp4(tmp_path / "videos" / "video1.mp4", num_frames=4)
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"video_id": 1, "question": "q", "answer": "a", "id": 0},
            {"video_id": 2, "question": "q", "answer": "a", "id": 1},
            "{not json",
        ],
    )

    dataset = VQATestDataset(
        path, tmp_path / "videos", video_loader(), benchmark="msrvtt_qa", skip_bad=True
    )

    assert dataset.skipped == 2 and len(dataset) == 1
    assert dataset.items[0].question_id == 0
