"""Decoding of images and video frames into the normalised tensors BLIP's vision encoder reads.

An image is treated as a single frame: both paths resize with bicubic interpolation to a square
``size`` and normalise each channel with BLIP's mean and standard deviation,
``x -> (x / 255 - mean) / std``. Videos are decoded with PyAV; ``sample_frame_indices`` picks which
frames to keep (one per equal segment of the clip). ``ImageLoader`` and ``VideoLoader`` wrap both
paths as ``path -> tensor`` callables for the datasets in ``peft_cp.blip.data``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

BLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

FrameSampling = Literal["random", "uniform"]
# File suffixes read as videos (everything else is read as an image).
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class MediaError(OSError):
    """An image or video file is missing or cannot be decoded; the message names the file."""


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack RGB images of one size into a normalised float tensor of shape (N, 3, H, W).

    Each value becomes ``(x / 255 - mean[c]) / std[c]`` with BLIP's ``BLIP_MEAN`` / ``BLIP_STD``.
    """
    if not images:
        raise ValueError("images_to_tensor: `images` is empty; expected at least one image.")

    rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in rgb])
    frames = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)

    mean = torch.tensor(BLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(BLIP_STD).view(1, 3, 1, 1)
    return frames.sub_(mean).div_(std)


def load_image(path: str | Path) -> Image.Image:
    """Read an image file into memory as an RGB ``PIL.Image``.

    Raises:
        MediaError: the file does not exist or Pillow cannot decode it.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: image file does not exist.")

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise MediaError(f"{path}: cannot decode image ({error}).") from error


class ImageTransform:
    """Resize an image to ``size x size`` (bicubic) and normalise it to a (3, size, size) tensor.

    With ``train=True`` the image is first augmented the way BLIP fine-tunes: a random resized crop
    covering ``scale`` of the area (aspect ratio in [3/4, 4/3]) and a horizontal flip with
    probability ``flip_prob``. Randomness comes from ``generator`` (or a new one seeded with
    ``seed``); leave both unset under a multi-worker ``DataLoader`` so each worker draws from its
    own seeded global generator instead of sharing one copied state.
    """

    # Attempts at drawing a crop that fits inside the image before falling back to a centre crop.
    _CROP_ATTEMPTS = 10

    def __init__(
        self,
        size: int,
        train: bool = False,
        scale: tuple[float, float] = (0.5, 1.0),
        flip_prob: float = 0.5,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"ImageTransform: `size` must be a positive int, got {size!r}.")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(
                f"ImageTransform: `scale` must satisfy 0 < low <= high <= 1, got {scale!r}."
            )
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"ImageTransform: `flip_prob` must be in [0, 1], got {flip_prob!r}.")
        if generator is not None and seed is not None:
            raise ValueError("ImageTransform: pass `generator` or `seed`, not both.")

        if seed is not None:
            generator = torch.Generator().manual_seed(seed)

        self.size = size
        self.train = train
        self.scale = scale
        self.flip_prob = flip_prob
        self.generator = generator

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return the transformed image as a float tensor of shape (3, size, size)."""
        box = (0, 0, image.width, image.height)
        if self.train:
            box = self._random_crop_box(image.width, image.height)

        resized = image.convert("RGB").resize(
            (self.size, self.size), Image.Resampling.BICUBIC, box=box
        )

        if self.train and self._uniform(1).item() < self.flip_prob:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

        return images_to_tensor([resized])[0]

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)

    def _random_crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_low, log_high = math.log(3 / 4), math.log(4 / 3)

        for _ in range(self._CROP_ATTEMPTS):
            area_u, ratio_u, left_u, top_u = self._uniform(4).tolist()
            target_area = area * (self.scale[0] + area_u * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_low + ratio_u * (log_high - log_low))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))

            if 0 < crop_w <= width and 0 < crop_h <= height:
                left = int(left_u * (width - crop_w + 1))
                top = int(top_u * (height - crop_h + 1))
                return left, top, left + crop_w, top + crop_h

        # Very elongated images can miss every draw; a centre square keeps the content in view.
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side


class ImageLoader:
    """Load an image file and apply ``transform``: path -> (3, H, W) float tensor."""

    kind: ClassVar[str] = "image"

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def __call__(self, path: Path) -> torch.Tensor:
        return self.transform(load_image(path))


def sample_frame_indices(
    num_frames_in_video: int,
    num_samples: int,
    mode: FrameSampling,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Choose ``num_samples`` frame indices, one from each of ``num_samples`` equal segments.

    Segment k covers frames ``[k * n // s, (k + 1) * n // s)``. ``"random"`` (training) draws one
    frame uniformly inside each segment; ``"uniform"`` (testing) takes the frame at the segment's
    centre, ``(2k + 1) * n // (2s)``. A video with fewer frames than samples has empty segments;
    those repeat the frame at their start, so the result is always non-decreasing.
    """
    if num_frames_in_video < 1:
        raise ValueError(
            f"sample_frame_indices: `num_frames_in_video` must be >= 1, got {num_frames_in_video}."
        )
    if num_samples < 1:
        raise ValueError(f"sample_frame_indices: `num_samples` must be >= 1, got {num_samples}.")

    n, s = num_frames_in_video, num_samples
    if mode == "uniform":
        return [(2 * k + 1) * n // (2 * s) for k in range(s)]
    if mode != "random":
        raise ValueError(
            f"sample_frame_indices: `mode` must be 'random' or 'uniform', got {mode!r}."
        )

    starts = torch.tensor([k * n // s for k in range(s)])
    ends = torch.tensor([(k + 1) * n // s for k in range(s)])
    lengths = (ends - starts).clamp(min=1)
    offsets = (torch.rand(s, generator=generator) * lengths).long().clamp(max=lengths - 1)
    return (starts + offsets).tolist()


def load_video_frames(
    path: str | Path,
    num_samples: int,
    mode: FrameSampling,
    size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode ``num_samples`` frames of a video into a normalised (T, 3, size, size) tensor.

    Frames are chosen with ``sample_frame_indices`` (so short videos repeat frames), resized with
    bicubic interpolation and normalised like ``ImageTransform``.

    Raises:
        MediaError: the file does not exist, PyAV cannot decode it, or it has no video frames.
    """
    if num_samples < 1:
        raise ValueError(f"load_video_frames: `num_samples` must be >= 1, got {num_samples}.")
    if mode not in ("random", "uniform"):
        raise ValueError(f"load_video_frames: `mode` must be 'random' or 'uniform', got {mode!r}.")
    if size < 1:
        raise ValueError(f"load_video_frames: `size` must be >= 1, got {size}.")

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: video file does not exist.")

    try:
        frames = decode_sampled_frames(path, num_samples, mode, generator)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise MediaError(f"{path}: cannot decode video ({error}).") from error

    images = [frame.resize((size, size), Image.Resampling.BICUBIC) for frame in frames]
    return images_to_tensor(images)


class VideoLoader:
    """Decode ``num_frames`` frames of a video: path -> (T, 3, size, size) float tensor.

    Use ``mode="random"`` for training and ``"uniform"`` for evaluation (see
    ``sample_frame_indices``). As with ``ImageTransform``, leave ``generator`` unset under a
    multi-worker ``DataLoader``.
    """

    kind: ClassVar[str] = "video"

    def __init__(
        self,
        num_frames: int,
        size: int,
        mode: FrameSampling,
        generator: torch.Generator | None = None,
    ) -> None:
        self.num_frames = num_frames
        self.size = size
        self.mode = mode
        self.generator = generator

    def __call__(self, path: Path) -> torch.Tensor:
        return load_video_frames(path, self.num_frames, self.mode, self.size, self.generator)


MediaLoader = ImageLoader | VideoLoader


def decode_sampled_frames(
    path: Path, num_samples: int, mode: FrameSampling, generator: torch.Generator | None
) -> list[Image.Image]:
    """`num_samples` frames of the video at `path`, chosen by `mode` ("uniform": evenly spaced;
    "random": one at random per equal segment, drawn from `generator`).

    Raises:
        MediaError: naming the file when it has no (decodable) frames.
    """
    frame_count = _count_frames(path)
    if frame_count == 0:
        raise MediaError(f"{path}: video stream has no frames.")

    indices = sample_frame_indices(frame_count, num_samples, mode, generator)
    kept, decoded = _decode_frames(path, indices)

    # Container metadata can over-count frames; sample again over the frames that really decode.
    if len(kept) < len(set(indices)):
        if decoded == 0:
            raise MediaError(f"{path}: video stream has no decodable frames.")
        logger.debug("%s: header reports %d frames but %d decode", path, frame_count, decoded)
        indices = sample_frame_indices(decoded, num_samples, mode, generator)
        kept, _ = _decode_frames(path, indices)

    return [kept[index] for index in indices]


def _count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames

        # WebM and raw streams carry no frame count; counting packets avoids decoding.
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _decode_frames(path: Path, indices: Sequence[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode the frames at ``indices`` as RGB images; also return how many frames were read."""
    wanted = set(indices)
    kept: dict[int, Image.Image] = {}
    last_wanted = max(wanted)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        position = -1
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                kept[position] = frame.to_image()
            if position >= last_wanted:
                break

    return kept, position + 1
