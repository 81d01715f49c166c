"""Case studies as one self-contained HTML page: retrieval rankings and question answering.

Every image is embedded as a base64 JPEG thumbnail and every video as a strip of a few frames, so
the page can be mailed or attached to a report without its media. Ground truth is marked with a
green border (retrieval) and correct answers in green, wrong ones in red (question answering).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import av
from PIL import Image, ImageDraw

from .files import write_text_atomic
from .metrics import exact_match_accuracy, normalize_vqa_answer, vqa_accuracy
from .video import VIDEO_SUFFIXES, MediaError, decode_sampled_frames, load_image

__all__ = [
    "MediaCandidate",
    "QACase",
    "TextCandidate",
    "TextToMediaCase",
    "MediaToTextCase",
    "write_qa_cases_html",
    "write_retrieval_cases_html",
]

Missing = Literal["error", "placeholder"]


@dataclass
class MediaCandidate:
    """A retrieved image or video, its score and whether it is a ground-truth match."""

    path: str | Path
    score: float
    ground_truth: bool = False


@dataclass
class TextCandidate:
    """A retrieved text, its score and whether it is a ground-truth match."""

    text: str
    score: float
    ground_truth: bool = False


@dataclass
class TextToMediaCase:
    """Text-to-image (or video) retrieval: a query text and its top-ranked media, best first."""

    query: str
    candidates: Sequence[MediaCandidate]


@dataclass
class MediaToTextCase:
    """Image (or video) to text retrieval: a query medium and its top-ranked texts, best first."""

    query: str | Path
    candidates: Sequence[TextCandidate]


@dataclass
class QACase:
    """A question about an image or video, the predicted answer and the reference answers.

    `score` is the prediction's accuracy in [0, 1]; left as None it is computed: VQAv2 accuracy
    (`peft_cp.blip.metrics.vqa_accuracy`) with two or more references, exact match with one.
    """

    media: str | Path
    question: str
    prediction: str
    references: Sequence[str] = field(default_factory=list)
    score: float | None = None


RetrievalCase = TextToMediaCase | MediaToTextCase


def write_retrieval_cases_html(
    path: str | os.PathLike[str],
    cases: Sequence[RetrievalCase],
    title: str,
    thumbnail_size: int = 160,
    video_frames: int = 4,
    missing: Missing = "error",
) -> None:
    """Write retrieval case studies (text-to-media, media-to-text or both) to one HTML file.

    Each case is a `<section class="case">` holding the query and its candidates in rank order
    with their scores; ground-truth candidates carry the class "gt" (green border).

    Args:
        path: HTML file to write; its folder must exist. Written atomically.
        cases: `TextToMediaCase` and/or `MediaToTextCase` items.
        title: Page title.
        thumbnail_size: Longest side of every thumbnail, in pixels.
        video_frames: Frames shown per video, evenly spread over the clip.
        missing: "error" raises FileNotFoundError for a missing media file before anything is
            written; "placeholder" draws a grey box naming the file instead.
    """
    media = _MediaRenderer(thumbnail_size, video_frames, missing)
    _check_media(
        [c.query for c in cases if isinstance(c, MediaToTextCase)]
        + [m.path for c in cases if isinstance(c, TextToMediaCase) for m in c.candidates],
        missing,
    )

    sections = []
    for index, case in enumerate(cases):
        if isinstance(case, TextToMediaCase):
            query = f'<p class="query">{html.escape(case.query)}</p>'
            items = [
                _candidate(media.render(c.path), c.score, c.ground_truth, rank)
                for rank, c in enumerate(case.candidates, start=1)
            ]
        elif isinstance(case, MediaToTextCase):
            query = f'<div class="query">{media.render(case.query)}</div>'
            items = [
                _candidate(f'<p class="text">{html.escape(c.text)}</p>', c.score, c.ground_truth, r)
                for r, c in enumerate(case.candidates, start=1)
            ]
        else:
            raise TypeError(
                f"cases[{index}] must be a TextToMediaCase or MediaToTextCase, got "
                f"{type(case).__name__}."
            )
        sections.append(
            f'<section class="case"><h2>Case {index + 1}</h2>{query}'
            f'<div class="candidates">{"".join(items)}</div></section>'
        )

    write_text_atomic(path, _page(title, sections))


def write_qa_cases_html(
    path: str | os.PathLike[str],
    cases: Sequence[QACase],
    title: str,
    thumbnail_size: int = 240,
    video_frames: int = 4,
    missing: Missing = "error",
) -> None:
    """Write question-answering case studies to one HTML file.

    Each case is a `<section class="case">` with the medium, the question, the prediction (class
    "correct" when its score is positive, else "wrong") and the references, those matching the
    prediction carrying the class "match". Arguments as in
    `write_retrieval_cases_html`.
    """
    media = _MediaRenderer(thumbnail_size, video_frames, missing)
    _check_media([case.media for case in cases], missing)

    sections = []
    for index, case in enumerate(cases):
        score = case.score
        if score is None:
            if not case.references:
                raise ValueError(
                    f"cases[{index}] has no references and no score; give one or the other."
                )
            references = list(case.references)
            score = (
                vqa_accuracy(case.prediction, references)
                if len(references) > 1
                else exact_match_accuracy({0: case.prediction}, {0: references[0]}) / 100
            )

        # Matches follow the scoring rule: VQA normalisation for several references, exact match
        # (case and surrounding spaces aside) for one.
        if len(case.references) > 1:
            predicted = normalize_vqa_answer(case.prediction)
            matches = [normalize_vqa_answer(r) == predicted for r in case.references]
        else:
            predicted = case.prediction.strip().lower()
            matches = [r.strip().lower() == predicted for r in case.references]
        references = "".join(
            f'<li class="{"match" if match else "other"}">{html.escape(r)}</li>'
            for r, match in zip(case.references, matches, strict=True)
        )
        verdict = "correct" if score > 0 else "wrong"
        sections.append(
            f'<section class="case"><h2>Case {index + 1}</h2>'
            f'<div class="query">{media.render(case.media)}</div>'
            f'<p class="question">Q: {html.escape(case.question)}</p>'
            f'<p class="prediction {verdict}">A: {html.escape(case.prediction)} '
            f'<span class="score">(accuracy {score:.2f})</span></p>'
            f'<ul class="references">{references}</ul></section>'
        )

    write_text_atomic(path, _page(title, sections))


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.case { border-top: 1px solid #ccc; padding: 0.5em 0; }
.candidates { display: flex; flex-wrap: wrap; gap: 0.6em; align-items: flex-start; }
.candidate { border: 4px solid transparent; padding: 3px; max-width: 30em; }
.candidate.gt { border-color: #2a2; }
.rank { font-size: 0.8em; color: #555; }
.strip { display: flex; gap: 2px; }
.query { font-weight: bold; }
.correct { color: #2a2; } .wrong { color: #c22; }
li.match { color: #2a2; font-weight: bold; }
"""


def _page(title: str, sections: Sequence[str]) -> str:
    title = html.escape(title)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head>\n<body><h1>{title}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _candidate(content: str, score: float, ground_truth: bool, rank: int) -> str:
    marker = " gt" if ground_truth else ""
    label = " (ground truth)" if ground_truth else ""
    return (
        f'<div class="candidate{marker}">{content}'
        f'<div class="rank">#{rank} score {score:.3f}{label}</div></div>'
    )


def _check_media(paths: Sequence[str | Path], missing: Missing) -> None:
    if missing not in ("error", "placeholder"):
        raise ValueError(f"missing must be 'error' or 'placeholder', got {missing!r}.")
    if missing == "error":
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"{path}: media file does not exist (pass missing='placeholder' to draw a "
                    "placeholder instead)."
                )


class _MediaRenderer:
    """Turns a media path into `<img>` tags of base64 JPEG thumbnails (a strip for a video)."""

    def __init__(self, thumbnail_size: int, video_frames: int, missing: Missing) -> None:
        if thumbnail_size < 8:
            raise ValueError(f"thumbnail_size must be >= 8 pixels, got {thumbnail_size}.")
        if video_frames < 1:
            raise ValueError(f"video_frames must be >= 1, got {video_frames}.")
        self.thumbnail_size = thumbnail_size
        self.video_frames = video_frames
        self.missing = missing

    def render(self, path: str | Path) -> str:
        path = Path(path)
        name = html.escape(path.name)
        if not path.is_file():
            return self._img(_placeholder(path.name, self.thumbnail_size), f"missing: {name}")

        if path.suffix.lower() not in VIDEO_SUFFIXES:
            return self._img(load_image(path), name)

        frames = self._video_frames(path)
        strip_size = max(8, self.thumbnail_size // 2)
        tags = "".join(self._img(frame, f"{name} frame", strip_size) for frame in frames)
        return f'<div class="strip" title="{name}">{tags}</div>'

    def _video_frames(self, path: Path) -> list[Image.Image]:
        try:
            return decode_sampled_frames(path, self.video_frames, "uniform", None)
        except MediaError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise MediaError(f"{path}: cannot decode video ({error}).") from error

    def _img(self, image: Image.Image, alt: str, size: int | None = None) -> str:
        thumbnail = image.convert("RGB")
        size = size or self.thumbnail_size
        thumbnail.thumbnail((size, size))
        buffer = io.BytesIO()
        thumbnail.save(buffer, format="JPEG", quality=85)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f'<img src="data:image/jpeg;base64,{data}" alt="{alt}">'


def _placeholder(name: str, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size * 3 // 4), (200, 200, 200))
    ImageDraw.Draw(image).text((4, 4), f"missing:\n{name}", fill=(60, 60, 60))
    return image
