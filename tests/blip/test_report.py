"""HTML case studies from generated JPEGs and MP4s: structure, ground truth, escaping, errors."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from peft_cp.blip.report import (
    MediaCandidate,
    MediaToTextCase,
    QACase,
    TextCandidate,
    TextToMediaCase,
    write_qa_cases_html,
    write_retrieval_cases_html,
)


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_mp4(path: Path, num_frames: int = 10, side: int = 32) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        for i in range(num_frames):
            pixels = np.full((side, side, 3), 20 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class Page(HTMLParser):
    """Collects the elements of a case-study page: sections, candidates, images, list items."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cases = 0
        self.candidates: list[str] = []
        self.images: list[str] = []
        self.strips = 0
        self.classes: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = attrs.get("class", "")
        self.classes.append(classes)
        if tag == "section" and classes == "case":
            self.cases += 1
        if tag == "div" and classes.startswith("candidate") and classes != "candidates":
            self.candidates.append(classes)
        if tag == "div" and classes == "strip":
            self.strips += 1
        if tag == "img":
            self.images.append(attrs["src"])


@pytest.fixture
def media(tmp_path):
    images = [write_jpeg(tmp_path / f"image_{i}.jpg", seed=i) for i in range(4)]
    video = write_mp4(tmp_path / "clip.mp4")
    return images, video


def text_to_media_case(query, paths, ground_truth):
    candidates = [
        MediaCandidate(path, score=1.0 - 0.1 * rank, ground_truth=rank in ground_truth)
        for rank, path in enumerate(paths)
    ]
    return TextToMediaCase(query, candidates)


def test_retrieval_page_has_every_case_candidate_and_ground_truth(media, tmp_path):
    images, video = media
    cases = [
        text_to_media_case("a dog", [*images, video], ground_truth={1}),
        text_to_media_case("a <b>cat</b> & co", [video, *images], ground_truth={0, 4}),
    ]
    path = tmp_path / "retrieval.html"

    write_retrieval_cases_html(path, cases, title="Top-5 <MSR-VTT>", video_frames=3)

    text = path.read_text()
    page = Page(text)
    assert page.cases == 2
    assert page.candidates == [
        "candidate",
        "candidate gt",
        "candidate",
        "candidate",
        "candidate",
        "candidate gt",
        "candidate",
        "candidate",
        "candidate",
        "candidate gt",
    ]
    assert page.strips == 2
    assert len(page.images) == 2 * (4 + 3)
    assert "a &lt;b&gt;cat&lt;/b&gt; &amp; co" in text and "<b>cat" not in text
    assert "<title>Top-5 &lt;MSR-VTT&gt;</title>" in text
    assert list(tmp_path.glob(".*.tmp")) == []


def test_thumbnails_are_embedded_jpegs_no_larger_than_asked(media, tmp_path):
    images, _ = media
    path = tmp_path / "retrieval.html"

    write_retrieval_cases_html(path, [text_to_media_case("q", images, {0})], "t", thumbnail_size=40)

    for source in Page(path.read_text()).images:
        prefix = "data:image/jpeg;base64,"
        assert source.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(source[len(prefix) :]))) as thumbnail:
            assert thumbnail.format == "JPEG"
            assert max(thumbnail.size) == 40


def test_image_to_text_case_marks_the_matching_texts(media, tmp_path):
    images, video = media
    texts = [TextCandidate(f"caption {i} <", 0.9 - 0.1 * i, ground_truth=i == 2) for i in range(5)]
    cases = [MediaToTextCase(images[0], texts), MediaToTextCase(video, texts)]
    path = tmp_path / "i2t.html"

    write_retrieval_cases_html(path, cases, "image to text")

    page = Page(path.read_text())
    assert page.cases == 2
    assert page.candidates.count("candidate gt") == 2
    assert len(page.candidates) == 10
    assert len(page.images) == 1 + 4
    assert "caption 2 &lt;" in path.read_text()


def test_qa_page_marks_correct_and_wrong_answers(media, tmp_path):
    images, video = media
    cases = [
        QACase(images[0], "What is it?", "A dog", ["dog", "dog", "puppy", "dog"]),
        QACase(video, "Who cooks?", "man", ["woman"]),
        QACase(images[1], "Is it <red>?", "yes", [], score=1.0),
    ]
    path = tmp_path / "qa.html"

    write_qa_cases_html(path, cases, "VQA")

    text = path.read_text()
    page = Page(text)
    assert page.cases == 3
    assert page.classes.count("prediction correct") == 2
    assert page.classes.count("prediction wrong") == 1
    assert page.classes.count("match") == 3  # the three "dog" references of case 1
    assert page.strips == 1
    assert "Is it &lt;red&gt;?" in text


def test_missing_media_is_an_error_unless_placeholders_are_asked_for(media, tmp_path):
    images, _ = media
    absent = tmp_path / "absent.jpg"
    cases = [text_to_media_case("q", [images[0], absent], {1})]
    path = tmp_path / "retrieval.html"

    with pytest.raises(FileNotFoundError, match="absent.jpg: media file does not exist"):
        write_retrieval_cases_html(path, cases, "t")
    with pytest.raises(FileNotFoundError, match="absent.jpg: media file does not exist"):
        write_qa_cases_html(path, [QACase(absent, "q", "a", ["a", "b"])], "t")
    assert not path.exists()

    write_retrieval_cases_html(path, cases, "t", missing="placeholder")

    assert len(Page(path.read_text()).images) == 2
    assert 'alt="missing: absent.jpg"' in path.read_text()


def test_invalid_arguments_are_named(media, tmp_path):
    images, _ = media
    cases = [text_to_media_case("q", images, {0})]

    with pytest.raises(FileNotFoundError, match="folder .*nowhere.* does not exist"):
        write_retrieval_cases_html(tmp_path / "nowhere" / "r.html", cases, "t")
    with pytest.raises(ValueError, match="missing must be 'error' or 'placeholder'"):
        write_retrieval_cases_html(tmp_path / "r.html", cases, "t", missing="skip")
    with pytest.raises(TypeError, match=r"cases\[0\] must be a TextToMediaCase"):
        write_retrieval_cases_html(tmp_path / "r.html", ["q"], "t")
    with pytest.raises(ValueError, match=r"cases\[0\] has no references and no score"):
        write_qa_cases_html(tmp_path / "qa.html", [QACase(images[0], "q", "a")], "t")
