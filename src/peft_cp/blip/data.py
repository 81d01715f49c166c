"""Annotations, datasets and collate functions for fine-tuning BLIP on six benchmarks.

The annotation files are the ones the BLIP family of code bases (salesforce/BLIP, UniAdapter)
publishes:

- image-text retrieval, MSCOCO (Karpathy split) and Flickr30K: JSON lists with one entry per
  caption for training and one entry per image (with all its captions) for val/test;
- video-text retrieval, MSR-VTT and DiDeMo: JSON-lines, one caption per line; DiDeMo joins the
  sentences of a clip into one paragraph;
- VQAv2 (optionally with Visual Genome QA): JSON lists;
- MSRVTT-QA: JSON-lines or a JSON list.

Readers return plain dataclasses and raise ``AnnotationError`` naming the file, the 1-based line
(JSON-lines) or 0-based entry (JSON list) and the field at fault. The datasets combine a reader with
an ``ImageLoader`` or ``VideoLoader`` from ``peft_cp.blip.video`` and return dictionaries whose
``pixel_values`` key matches what Hugging Face BLIP models take.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict, TypeVar

import torch
from torch.utils.data import Dataset

from peft_cp.blip.video import VIDEO_SUFFIXES, MediaError, MediaLoader

logger = logging.getLogger(__name__)

IMAGE_CAPTION_WORDS = 30
VIDEO_CAPTION_WORDS = 40
QUESTION_WORDS = 50
# Weight of a Visual Genome answer in the training loss, as in BLIP's VQA recipe: one annotator's
# single answer counts for less than a VQAv2 question's consensus, whose weights sum to 1.
VG_ANSWER_WEIGHT = 0.2

RetrievalBenchmark = Literal["coco", "flickr30k", "msrvtt", "didemo"]
QABenchmark = Literal["vqav2", "msrvtt_qa"]
QASource = Literal["vqa", "vg", "msrvtt_qa"]

_VIDEO_BENCHMARKS = ("msrvtt", "didemo", "msrvtt_qa")
_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_MSRVTT_VIDEO_ID = re.compile(r"(?:video)?(\d+)")

# How many offending files or entries a skip warning lists before summarising the rest.
_REPORTED_PROBLEMS = 3

_Item = TypeVar("_Item")
_Sample = TypeVar("_Sample")


# ---------------------------------------------------------------------------------------------
# Text cleaning


def clean_caption(text: str, max_words: int = IMAGE_CAPTION_WORDS) -> str:
    """Normalise a caption the way BLIP does before tokenising it.

    The text is lower-cased, each of ``. ! " ( ) * # : ; ~`` becomes a space, runs of whitespace
    collapse to one space, and only the first ``max_words`` words are kept. BLIP uses 30 words for
    image captions (``IMAGE_CAPTION_WORDS``) and 40 for video captions (``VIDEO_CAPTION_WORDS``).
    """
    _check_max_words(max_words, "clean_caption")

    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


def clean_question(text: str, max_words: int = QUESTION_WORDS) -> str:
    """Normalise a VQA question the way BLIP does before tokenising it.

    Unlike ``clean_caption`` the punctuation ``. ! " ( ) * # : ; ~`` is deleted rather than replaced
    by a space (so ``"u.s."`` becomes ``"us"``); the question mark is kept, as BLIP keeps it. The
    text is lower-cased, whitespace collapsed, and cut to the first ``max_words`` words.
    """
    _check_max_words(max_words, "clean_question")

    words = _PUNCTUATION.sub("", text.lower()).split()
    return " ".join(words[:max_words])


def _check_max_words(max_words: int, caller: str) -> None:
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"{caller}: `max_words` must be a positive int, got {max_words!r}.")


# ---------------------------------------------------------------------------------------------
# Annotation records


class AnnotationError(ValueError):
    """An annotation file or one of its entries is malformed; the message says where and why."""


@dataclass(frozen=True)
class CaptionItem:
    """A media file (image or video, relative to the media root) and captions that describe it.

    ``media_id`` groups entries that show the same media: the ``image_id`` of a training entry, the
    image path of a val/test entry, or the clip name of a video.
    """

    media: str
    captions: tuple[str, ...]
    media_id: str


@dataclass(frozen=True)
class QAItem:
    """A question about a media file, with candidate answers weighted by the share of annotators.

    Test entries of VQAv2 have no answers (``answers == ()``); ``source`` says which media root
    the file lives under (VQAv2 images, Visual Genome images or MSR-VTT videos).
    """

    media: str
    question: str
    answers: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    question_id: int | None = None
    source: QASource = "vqa"


def read_image_text_annotations(
    path: str | Path,
    split: Literal["train", "val", "test"],
    errors: list[AnnotationError] | None = None,
) -> list[CaptionItem]:
    """Read an MSCOCO-Karpathy or Flickr30K annotation list in BLIP's format.

    Training entries are ``{"image", "caption", "image_id"}`` with one caption each; val/test
    entries are ``{"image", "caption": [captions]}``, one per image. When ``errors`` is a list,
    malformed entries are appended to it and skipped instead of raised.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"`split` must be 'train', 'val' or 'test', got {split!r}.")

    def parse(where: str, record: Any) -> CaptionItem:
        image = _text_field(record, "image", where)
        if split == "train":
            media_id = _id_field(record, "image_id", where)
            return CaptionItem(image, (_text_field(record, "caption", where),), media_id)
        return CaptionItem(image, _text_list_field(record, "caption", where), image)

    return _parse_entries(Path(path), "list", parse, errors)


def read_video_text_annotations(
    path: str | Path,
    paragraph: bool = False,
    video_suffix: str = ".mp4",
    errors: list[AnnotationError] | None = None,
) -> list[CaptionItem]:
    """Read MSR-VTT or DiDeMo ``{"clip_name", "caption"}`` JSON-lines, one item per line.

    With ``paragraph=True`` (DiDeMo paragraph-to-video retrieval) the sentences of each clip are
    joined with spaces into a single caption, one item per clip in order of first appearance.
    The video file is ``clip_name + video_suffix`` unless the clip name already ends in a video
    suffix. A ``caption`` may also be a list of sentences. When ``errors`` is a list, malformed
    lines are appended to it and skipped instead of raised.
    """

    def parse(where: str, record: Any) -> CaptionItem:
        clip = _text_field(record, "clip_name", where)
        if isinstance(_field(record, "caption", where), list):
            captions = _text_list_field(record, "caption", where)
        else:
            captions = (_text_field(record, "caption", where),)

        media = clip if clip.lower().endswith(VIDEO_SUFFIXES) else clip + video_suffix
        return CaptionItem(media, captions, clip)

    items = _parse_entries(Path(path), "either", parse, errors)
    if not paragraph:
        return items

    sentences: dict[str, list[str]] = {}
    media: dict[str, str] = {}
    for item in items:
        sentences.setdefault(item.media_id, []).extend(text.strip() for text in item.captions)
        media.setdefault(item.media_id, item.media)
    return [CaptionItem(media[clip], (" ".join(texts),), clip) for clip, texts in sentences.items()]


def read_vqa_annotations(
    path: str | Path,
    split: Literal["train", "test"],
    vg_answer_weight: float = VG_ANSWER_WEIGHT,
    errors: list[AnnotationError] | None = None,
) -> list[QAItem]:
    """Read a VQAv2 (optionally Visual Genome) annotation list in BLIP's format.

    Training entries are ``{"question", "image", "answer": [human answers]}``; each distinct answer
    is weighted by its share of the list, so ``["a", "a", "b", "b"]`` gives ``a: 0.5, b: 0.5``.
    Entries with ``"dataset": "vg"`` are Visual Genome questions with a single answer string
    weighted ``vg_answer_weight`` (default 0.2, as BLIP's recipe). Test entries are
    ``{"question_id", "question", "image"}``. When ``errors`` is a list, malformed entries are
    appended to it and skipped instead of raised.
    """
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")

    def parse(where: str, record: Any) -> QAItem:
        question = _text_field(record, "question", where)
        image = _text_field(record, "image", where)
        source = record.get("dataset", "vqa")
        if source not in ("vqa", "vg"):
            raise AnnotationError(
                f"{where}: field 'dataset' must be 'vqa' or 'vg', got {source!r}."
            )

        if split == "test":
            question_id = _int_field(record, "question_id", where)
            return QAItem(image, question, question_id=question_id, source=source)

        question_id = None
        if "question_id" in record:
            question_id = _int_field(record, "question_id", where)
        if source == "vg":
            answer = _text_field(record, "answer", where)
            return QAItem(image, question, (answer,), (vg_answer_weight,), question_id, "vg")

        answers, weights = answer_weights(_text_list_field(record, "answer", where))
        return QAItem(image, question, answers, weights, question_id, "vqa")

    return _parse_entries(Path(path), "list", parse, errors)


def read_video_qa_annotations(
    path: str | Path,
    errors: list[AnnotationError] | None = None,
) -> list[QAItem]:
    """Read MSRVTT-QA ``{"video_id", "question", "answer", "id"}`` entries (JSON-lines or list).

    ``video_id`` is ``"video7010"``, ``"7010"`` or ``7010``; the file is ``video7010.mp4``. An
    entry without ``id`` takes its 0-based position among the file's entries as question id.
    When ``errors`` is a list, malformed entries are appended to it and skipped instead of raised.
    """
    position = -1

    def parse(where: str, record: Any) -> QAItem:
        nonlocal position
        position += 1

        video_id = _field(record, "video_id", where)
        match = (
            _MSRVTT_VIDEO_ID.fullmatch(str(video_id)) if not isinstance(video_id, bool) else None
        )
        if match is None:
            raise AnnotationError(
                f"{where}: field 'video_id' must look like 'video7010' or 7010, got {video_id!r}."
            )

        question = _text_field(record, "question", where)
        answer = _text_field(record, "answer", where)
        question_id = position
        if "id" in record:
            question_id = _int_field(record, "id", where)
        media = f"video{int(match.group(1))}.mp4"
        return QAItem(media, question, (answer,), (1.0,), question_id, "msrvtt_qa")

    return _parse_entries(Path(path), "either", parse, errors)


def read_answer_list(path: str | Path) -> list[str]:
    """Read the JSON list of candidate answers a VQA model ranks at test time."""
    path = Path(path)

    def parse(where: str, record: Any) -> str:
        if not isinstance(record, str) or not record.strip():
            raise AnnotationError(f"{where}: expected a non-empty answer string, got {record!r}.")
        return record

    return _parse_entries(path, "list", parse, None)


def answer_weights(answers: Sequence[str]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Return the distinct answers (first-appearance order) and the share of votes each received."""
    if not answers:
        raise ValueError("answer_weights: `answers` is empty; expected at least one answer.")

    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return tuple(counts), tuple(count / len(answers) for count in counts.values())


def _parse_entries(
    path: Path,
    layout: Literal["list", "either"],
    parse: Callable[[str, Any], _Item],
    errors: list[AnnotationError] | None,
) -> list[_Item]:
    items: list[_Item] = []
    for where, record in _records(path, layout, errors):
        try:
            items.append(parse(where, record))
        except AnnotationError as error:
            if errors is None:
                raise
            errors.append(error)
    return items


def _records(
    path: Path, layout: Literal["list", "either"], errors: list[AnnotationError] | None
) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` pairs; ``where`` names the file and the line or entry."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file does not exist.")
    text = path.read_text(encoding="utf-8")

    if layout == "list" or text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise AnnotationError(
                f"{path}, line {error.lineno}: invalid JSON ({error.msg})."
            ) from None
        if not isinstance(records, list):
            raise AnnotationError(
                f"{path}: expected a JSON list of entries, got a {type(records).__name__}."
            )
        for index, record in enumerate(records):
            yield f"{path}, entry {index}", record
        return

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problem = AnnotationError(f"{path}, line {number}: invalid JSON ({error.msg}).")
            if errors is None:
                raise problem from None
            errors.append(problem)
            continue
        yield f"{path}, line {number}", record


def _field(record: Any, name: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if name not in record:
        raise AnnotationError(f"{where}: field '{name}' is missing.")
    return record[name]


def _text_field(record: Any, name: str, where: str) -> str:
    value = _field(record, name, where)
    if not isinstance(value, str) or not value.strip():
        raise AnnotationError(f"{where}: field '{name}' must be a non-empty string, got {value!r}.")
    return value


def _text_list_field(record: Any, name: str, where: str) -> tuple[str, ...]:
    value = _field(record, name, where)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise AnnotationError(
            f"{where}: field '{name}' must be a non-empty list of strings, got {value!r}."
        )
    return tuple(value)


def _id_field(record: Any, name: str, where: str) -> str:
    """Read an identifier that may be written as a string or an integer, as a string."""
    value = _field(record, name, where)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise AnnotationError(
            f"{where}: field '{name}' must be a non-empty string or an integer, got {value!r}."
        )
    return str(value)


def _int_field(record: Any, name: str, where: str) -> int:
    """Read an integer that may also be written as a string of digits."""
    value = _field(record, name, where)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnnotationError(f"{where}: field '{name}' must be an integer, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------
# Datasets


class RetrievalTrainSample(TypedDict):
    pixel_values: torch.Tensor  # (3, H, W) image or (T, 3, H, W) video
    text: str
    media_index: int


class RetrievalEvalSample(TypedDict):
    pixel_values: torch.Tensor
    media_index: int


class VQATrainSample(TypedDict):
    pixel_values: torch.Tensor
    question: str
    answers: list[str]
    weights: list[float]


class VQATestSample(TypedDict):
    pixel_values: torch.Tensor
    question: str
    question_id: int


_Entry = TypeVar("_Entry", CaptionItem, QAItem)

# Consecutive entries tried in place of one whose media fails to decode (training with skip_bad).
_MAX_REPLACEMENTS = 10


class _MediaDataset(Dataset):
    """Media-root handling and the ``skip_bad`` bookkeeping shared by every dataset below.

    With ``skip_bad=True`` malformed annotation entries and entries whose media file does not
    exist are dropped at construction (a cheap ``Path.is_file`` per distinct file) and counted in
    ``skipped``. Files that exist but fail to decode are only found when loaded: training datasets
    then substitute the next loadable entry and count it in ``load_failures`` (per process, so
    ``DataLoader`` workers keep their own counts); evaluation datasets always raise, because a
    substitute would be scored against the wrong ground truth. With ``skip_bad=False`` the first
    problem raises ``AnnotationError`` or ``MediaError``. A file that is not valid JSON as a whole
    (a JSON list) or is missing always raises.
    """

    def __init__(
        self,
        media_root: str | Path,
        loader: MediaLoader,
        benchmark: str,
        skip_bad: bool,
    ) -> None:
        expected_kind = "video" if benchmark in _VIDEO_BENCHMARKS else "image"
        if loader.kind != expected_kind:
            raise ValueError(
                f"`loader` must be a {expected_kind.capitalize()}Loader for benchmark "
                f"{benchmark!r}, got {type(loader).__name__}."
            )

        self.media_root = Path(media_root)
        self.loader = loader
        self.skip_bad = skip_bad
        self.skipped = 0
        self.load_failures = 0

    def _media_path(self, item: CaptionItem | QAItem) -> Path:
        return self.media_root / item.media

    def _drop_bad(
        self,
        items: list[_Entry],
        errors: list[AnnotationError],
        source: str,
    ) -> list[_Entry]:
        """Drop items whose media file is missing (when skipping) and report what was skipped."""
        problems = [str(error) for error in errors]
        kept: list[_Entry] = items
        if self.skip_bad:
            exists: dict[Path, bool] = {}
            kept = []
            for item in items:
                path = self._media_path(item)
                if path not in exists:
                    exists[path] = path.is_file()
                if exists[path]:
                    kept.append(item)
                else:
                    problems.append(f"{path}: media file does not exist")

        self.skipped = len(problems)
        if problems:
            logger.warning(
                "%s: skipped %d of %d entries with malformed annotations or missing media; "
                "first: %s",
                source,
                len(problems),
                len(problems) + len(kept),
                "; ".join(problems[:_REPORTED_PROBLEMS]),
            )
        return kept

    def _with_replacement(self, index: int, load: Callable[[int], _Sample]) -> _Sample:
        """Load entry ``index``, or with ``skip_bad`` the next entry whose media decodes."""
        if not self.skip_bad:
            return load(index)

        attempts = min(len(self), _MAX_REPLACEMENTS)
        last_error: MediaError | None = None
        for offset in range(attempts):
            try:
                return load((index + offset) % len(self))
            except MediaError as error:
                self.load_failures += 1
                logger.warning("%s Substituting the next entry.", error)
                last_error = error

        raise MediaError(
            f"{self.media_root}: {attempts} consecutive entries from entry {index} failed to load; "
            f"last error: {last_error}"
        )


def _caption_words(benchmark: RetrievalBenchmark, max_words: int | None) -> int:
    if max_words is not None:
        return max_words
    return VIDEO_CAPTION_WORDS if benchmark in _VIDEO_BENCHMARKS else IMAGE_CAPTION_WORDS


def _read_captions(
    path: str | Path,
    benchmark: RetrievalBenchmark,
    split: Literal["train", "test"],
    errors: list[AnnotationError] | None,
) -> list[CaptionItem]:
    if benchmark in ("coco", "flickr30k"):
        return read_image_text_annotations(path, split, errors=errors)
    if benchmark in ("msrvtt", "didemo"):
        return read_video_text_annotations(path, paragraph=benchmark == "didemo", errors=errors)
    raise ValueError(
        f"`benchmark` must be one of 'coco', 'flickr30k', 'msrvtt', 'didemo', got {benchmark!r}."
    )


def _read_questions(
    path: str | Path,
    benchmark: QABenchmark,
    split: Literal["train", "test"],
    vg_answer_weight: float,
    errors: list[AnnotationError] | None,
) -> list[QAItem]:
    if benchmark == "vqav2":
        return read_vqa_annotations(path, split, vg_answer_weight, errors=errors)
    if benchmark == "msrvtt_qa":
        return read_video_qa_annotations(path, errors=errors)
    raise ValueError(f"`benchmark` must be 'vqav2' or 'msrvtt_qa', got {benchmark!r}.")


class RetrievalTrainDataset(_MediaDataset):
    """Caption-media pairs for BLIP's contrastive and matching losses, one sample per caption.

    All captions of one image or clip share ``media_index`` (0 to ``num_media - 1`` in order of
    first appearance), which marks them as positives for each other in the contrastive loss.
    Captions are cleaned with ``clean_caption`` (30 words for images, 40 for videos by default).
    See ``_MediaDataset`` for ``skip_bad``.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        media_root: str | Path,
        loader: MediaLoader,
        *,
        benchmark: RetrievalBenchmark,
        max_words: int | None = None,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(media_root, loader, benchmark, skip_bad)
        max_words = _caption_words(benchmark, max_words)

        errors: list[AnnotationError] = []
        items = _read_captions(annotation_file, benchmark, "train", errors if skip_bad else None)
        items = self._drop_bad(items, errors, str(annotation_file))

        media_index: dict[str, int] = {}
        self.pairs: list[tuple[str, str, int]] = []
        for item in items:
            index = media_index.setdefault(item.media_id, len(media_index))
            for caption in item.captions:
                self.pairs.append((item.media, clean_caption(caption, max_words), index))
        self.num_media = len(media_index)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> RetrievalTrainSample:
        return self._with_replacement(index, self._load)

    def _load(self, index: int) -> RetrievalTrainSample:
        media, text, media_index = self.pairs[index]
        pixel_values = self.loader(self.media_root / media)
        return {"pixel_values": pixel_values, "text": text, "media_index": media_index}


class RetrievalEvalDataset(_MediaDataset):
    """One sample per image or clip, with the caption texts and the ground-truth pairing.

    ``texts`` lists every cleaned caption; ``text_to_media[t]`` is the media index of text ``t``
    and ``media_to_texts[m]`` the text indices of media ``m``, as recall@k needs them. Reads the
    val/test annotation format. See ``_MediaDataset`` for ``skip_bad``.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        media_root: str | Path,
        loader: MediaLoader,
        *,
        benchmark: RetrievalBenchmark,
        max_words: int | None = None,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(media_root, loader, benchmark, skip_bad)
        max_words = _caption_words(benchmark, max_words)

        errors: list[AnnotationError] = []
        items = _read_captions(annotation_file, benchmark, "test", errors if skip_bad else None)
        items = self._drop_bad(items, errors, str(annotation_file))

        captions: dict[str, list[str]] = {}
        files: dict[str, str] = {}
        for item in items:
            captions.setdefault(item.media_id, []).extend(item.captions)
            files.setdefault(item.media_id, item.media)

        self.media: list[str] = list(files.values())
        self.texts: list[str] = []
        self.text_to_media: list[int] = []
        self.media_to_texts: list[list[int]] = []
        for media_index, texts in enumerate(captions.values()):
            first = len(self.texts)
            self.texts.extend(clean_caption(text, max_words) for text in texts)
            self.text_to_media.extend([media_index] * len(texts))
            self.media_to_texts.append(list(range(first, len(self.texts))))

    def __len__(self) -> int:
        return len(self.media)

    def __getitem__(self, index: int) -> RetrievalEvalSample:
        pixel_values = self.loader(self.media_root / self.media[index])
        return {"pixel_values": pixel_values, "media_index": index}


class VQATrainDataset(_MediaDataset):
    """Question-answer samples for BLIP's answer-generation loss, each answer with its weight.

    Reads one or more VQAv2 files (e.g. BLIP's ``vqa_train``, ``vqa_val`` and ``vg_qa``) or
    MSRVTT-QA files. Visual Genome entries load from ``vg_root`` when given, else ``media_root``.
    Questions are cleaned with ``clean_question``. See ``_MediaDataset`` for ``skip_bad``.
    """

    def __init__(
        self,
        annotation_files: str | Path | Sequence[str | Path],
        media_root: str | Path,
        loader: MediaLoader,
        *,
        benchmark: QABenchmark,
        vg_root: str | Path | None = None,
        max_words: int = QUESTION_WORDS,
        vg_answer_weight: float = VG_ANSWER_WEIGHT,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(media_root, loader, benchmark, skip_bad)
        if isinstance(annotation_files, (str, Path)):
            annotation_files = [annotation_files]
        self.vg_root = Path(vg_root) if vg_root is not None else self.media_root
        self.max_words = max_words

        self.items: list[QAItem] = []
        errors: list[AnnotationError] = []
        for path in annotation_files:
            self.items += _read_questions(
                path, benchmark, "train", vg_answer_weight, errors if skip_bad else None
            )
        names = ", ".join(str(path) for path in annotation_files)
        self.items = self._drop_bad(self.items, errors, names)

    def _media_path(self, item: CaptionItem | QAItem) -> Path:
        return (self.vg_root if item.source == "vg" else self.media_root) / item.media

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> VQATrainSample:
        return self._with_replacement(index, self._load)

    def _load(self, index: int) -> VQATrainSample:
        item = self.items[index]
        return {
            "pixel_values": self.loader(self._media_path(item)),
            "question": clean_question(item.question, self.max_words),
            "answers": list(item.answers),
            "weights": list(item.weights),
        }


class VQATestDataset(_MediaDataset):
    """Questions with their ids for answer ranking at test time (VQAv2 test or MSRVTT-QA).

    The ground-truth answers, where the file has them (MSRVTT-QA), stay in ``items``.
    See ``_MediaDataset`` for ``skip_bad``.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        media_root: str | Path,
        loader: MediaLoader,
        *,
        benchmark: QABenchmark,
        max_words: int = QUESTION_WORDS,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(media_root, loader, benchmark, skip_bad)
        self.max_words = max_words

        errors: list[AnnotationError] = []
        items = _read_questions(
            annotation_file, benchmark, "test", 1.0, errors if skip_bad else None
        )
        self.items = self._drop_bad(items, errors, str(annotation_file))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> VQATestSample:
        item = self.items[index]
        assert item.question_id is not None  # both test readers always set it
        return {
            "pixel_values": self.loader(self.media_root / item.media),
            "question": clean_question(item.question, self.max_words),
            "question_id": item.question_id,
        }


# ---------------------------------------------------------------------------------------------
# Collate functions


def collate_retrieval_train(batch: Sequence[RetrievalTrainSample]) -> dict[str, Any]:
    """Batch training pairs: ``pixel_values`` (B, ...), ``text`` list, ``media_index`` (B,)."""
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "text": [sample["text"] for sample in batch],
        "media_index": torch.tensor([sample["media_index"] for sample in batch]),
    }


def collate_retrieval_eval(batch: Sequence[RetrievalEvalSample]) -> dict[str, Any]:
    """Batch evaluation media: ``pixel_values`` (B, ...) and ``media_index`` (B,)."""
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "media_index": torch.tensor([sample["media_index"] for sample in batch]),
    }


def collate_vqa_train(batch: Sequence[VQATrainSample]) -> dict[str, Any]:
    """Batch VQA training samples, flattening the answers of all questions into one list.

    Returns ``pixel_values`` (B, ...), ``question`` (B strings), ``answers`` (A strings),
    ``weights`` (A,) and ``answer_counts`` (B,), where question ``b`` owns ``answer_counts[b]``
    consecutive answers; the model repeats each question's state that many times.
    """
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "question": [sample["question"] for sample in batch],
        "answers": [answer for sample in batch for answer in sample["answers"]],
        "weights": torch.tensor([weight for sample in batch for weight in sample["weights"]]),
        "answer_counts": torch.tensor([len(sample["answers"]) for sample in batch]),
    }


def collate_vqa_test(batch: Sequence[VQATestSample]) -> dict[str, Any]:
    """Batch VQA test samples: ``pixel_values`` (B, ...), ``question`` list and ``question_id``."""
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "question": [sample["question"] for sample in batch],
        "question_id": torch.tensor([sample["question_id"] for sample in batch]),
    }
