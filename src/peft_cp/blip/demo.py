"""Offline demo material: a small synthetic captioned-image set and a word-level tokenizer.

The images show one coloured shape on a plain background, drawn with Pillow; their captions name
the colour and the shape, so a model can only retrieve the right image by reading both. The set is
deterministic for a given seed and written in the MSCOCO Karpathy annotation format that
`RetrievalTrainDataset` and `RetrievalEvalDataset` read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "a picture of a {colour} {shape}",
    "the {shape} is {colour}",
)
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")


def draw_shape(
    shape: str, colour: str, background: str, size: int, rng: random.Random
) -> Image.Image:
    """One `shape` of `colour` at a random position and scale on a `background` square."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.32) * size
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
        )
    else:
        bar = radius / 3
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=fill)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=fill)
    return image


def write_shapes_dataset(
    root: str | Path, train_per_combination: int = 3, image_size: int = 64, seed: int = 0
) -> dict[str, Path]:
    """Write images and train/test annotations under `root`; returns their paths.

    Every colour x shape pair appears `train_per_combination` times in training (random
    backgrounds and positions) and once in the test split, with one caption per template.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def entry(name: str, colour: str, shape: str, background: str) -> dict:
        draw_shape(shape, colour, background, image_size, rng).save(root / "images" / name)
        captions = [t.format(colour=colour, shape=shape, background=background) for t in TEMPLATES]
        return {"image": f"images/{name}", "caption": captions, "image_id": name}

    train, test = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            for copy in range(train_per_combination):
                background = rng.choice(list(BACKGROUNDS))
                item = entry(f"train_{colour}_{shape}_{copy}.png", colour, shape, background)
                train.extend({**item, "caption": caption} for caption in item["caption"])
            test.append(
                entry(f"test_{colour}_{shape}.png", colour, shape, rng.choice(list(BACKGROUNDS)))
            )

    files = {"train": root / "train.json", "test": root / "test.json"}
    files["train"].write_text(json.dumps(train))
    files["test"].write_text(
        json.dumps([{k: v for k, v in t.items() if k != "image_id"} for t in test])
    )
    return files


def demo_vocabulary() -> list[str]:
    """Every word the demo captions use."""
    words = set(COLOURS) | set(SHAPES) | set(BACKGROUNDS)
    for template in TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    return sorted(words)


def word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `words`, with BLIP's special-token ids.

    [PAD] = 0, [CLS] = 1 (BLIP's bos/enc token in `small_blip_config`), [SEP] = 2, [UNK] = 3;
    sequences are "[CLS] words [SEP]".
    """
    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocabulary.setdefault(word, len(vocabulary))

    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        cls_token="[CLS]",
        bos_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[SEP]",
        unk_token="[UNK]",
    )
