"""The instance-level demo digits: each scan drawn in a colour, at a size and a position, on a
background, with a caption that names all four ("a small red seven at the top left on a grey
background").

The plain demo's captions name only the digit, so ~27 test images share each caption and
image -> text retrieval cannot tell them apart. Here every image of a digit gets a different
(colour, size, position, background) combination (drawn without replacement per digit: 224
combinations for at most 183 scans of a digit), so every validation and test caption is unique
and retrieval has one right answer. The training split holds `TRAIN_RENDERS` renderings of
each scan, a share of them in black on white (`INK_ON_PAPER_SHARE`, see there). `label` /
`class_name` and the held-out zero-shot prompts are those of the plain demo, so zero-shot
classification of the digits works as before.

Training samples carry several captions in `json["captions"]` (drawn one per epoch by
`ImageTextDataModule(sample_captions=True)`): the full caption with the digit as a word and as
a numeral, one naming the digit and one attribute, and two of the plain demo's class captions,
so that the digit, which in-batch negatives seldom need, is learnt, and prompts that name only
the digit work. Validation and test samples carry only the full caption (retrieval counts
exactly the image's own caption) and the held-out prompts in `json["zeroshot_captions"]`.
A fourth split, "probe", draws each validation scan `PROBE_RENDERS` times afresh, as validation
samples are drawn: training data for linear probes that the CLIP never trained on. The same
seed gives byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from multimodal.data.demo import (
    CLASS_NAMES,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    render_captions,
    vqa_pairs,
)
from multimodal.data.digits import load_digit_images, split_indices
from multimodal.data.shards import Sample, encode_png

PREFIX = "instances"
IMAGE_SIZE = 32  # default side of the rendered images: 4x4 patches of 8 px
TRAIN_RENDERS = 8  # renderings of each training scan, each in other attributes
# Renderings of each validation scan in the "probe" split: data for a linear probe of a demo
# CLIP's image features that the CLIP never trained on (CLIP's own protocol: its probes fit on
# datasets it did not see). Probes fitted on the training renderings learn from features the
# CLIP has memorised (zero-shot top-1 0.997 on them, 0.948 on the validation scans), so their
# validation split cannot choose C; see README, "Linear probe and k-NN".
PROBE_RENDERS = 8
PROBE_STREAM = 1  # the probe split's random stream: default_rng([seed, PROBE_STREAM])
SPLITS = ("train", "val", "test", "probe")
# Share of the training renderings drawn in black ink on white, as the plain scans are (size
# and position still drawn at random). With every ink on every background equally often the
# demo CLIP never found the digits: zero-shot at chance (8-13%) after 632 steps, the same with
# captions that name only the digit, while one ink on one background reached 90% in 240 steps.
# Ink and background then explain most of the pixels, the class captions' text embeddings do
# not separate and the shapes get no gradient (contrastive feature suppression). Black on
# white renderings teach the shapes, which carry over to the coloured ones. More of them learn
# faster: validation zero-shot after 157 / 315 / 789 steps 0.31 / 0.67 / 0.93 with 0.6, 0.17 /
# 0.68 / 0.90 with 0.5, 0.11 / 0.34 / 0.85 with 0.4; test after 6 epochs 0.889-0.915 with
# 0.6 (bf16), after 10 (the shipped config, fp32) 0.922-0.941.
INK_ON_PAPER_SHARE = 0.6
# Inks are all darker than every background, so a digit's strokes are always darker than
# what surrounds them. With light and dark backgrounds both (an earlier palette: yellow and
# cyan inks, a black background) the contrast flips sign from image to image, and the demo's
# ViT did not learn the digits at all in the demo's step budget (a supervised classifier of the
# same tower: 10% after 200 steps, chance; 53% with one ink on one background).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (230, 110, 0),
    "green": (35, 150, 45),
    "blue": (35, 65, 225),
    "purple": (140, 45, 185),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (190, 190, 190),
    "pink": (240, 180, 195),
    "yellow": (245, 230, 140),
}
SIZES: dict[str, float] = {"small": 0.5, "large": 0.75}  # digit side / image side
# position -> (x, y) of the digit's top-left corner as a share of the free space. Corners only:
# at 32 px a digit of 16 or 24 px in a corner sits on the grid of 8 px patches, so the same
# digit gives the same patches wherever it is (only the position embeddings differ); with a
# centre position, off the grid, a supervised classifier of the demo's ViT reached 82% of the
# validation digits in a fixed step budget, 91-93% with the corners.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.0, 0.0),
    "top right": (1.0, 0.0),
    "bottom left": (0.0, 1.0),
    "bottom right": (1.0, 1.0),
}
# the plain demo's training templates, less "a small picture of a {name}" ("small" is a size)
CLASS_TEMPLATES = tuple(t for t in TRAIN_TEMPLATES if "small" not in t.split())
COLOUR_JITTER = 20  # each ink channel moves by up to this much; the background's brightness too


@dataclass(frozen=True)
class DigitInstance:
    """What one rendered image shows: the digit and its four attributes (keys of `COLOURS`,
    `SIZES`, `POSITIONS`, `BACKGROUNDS`)."""

    label: int
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        if not 0 <= self.label < len(CLASS_NAMES):
            raise ValueError(f"DigitInstance.label={self.label} must be in 0..9")
        for field, table in (
            ("colour", COLOURS),
            ("size", SIZES),
            ("position", POSITIONS),
            ("background", BACKGROUNDS),
        ):
            if getattr(self, field) not in table:
                raise ValueError(
                    f"DigitInstance.{field}={getattr(self, field)!r} must be one of {list(table)}"
                )

    def caption(
        self,
        *,
        numeral: bool = False,
        colour: bool = True,
        size: bool = True,
        position: bool = True,
        background: bool = True,
    ) -> str:
        """ "a small red seven at the top left on a grey background"; `numeral` writes "7",
        the flags leave attributes out ("a seven on a grey background")."""
        digit = str(self.label) if numeral else CLASS_NAMES[self.label]
        words = ["a"] + [self.size] * size + [self.colour] * colour + [digit]
        if position:
            words.append(f"at the {self.position}")
        if background:
            words.append(f"on a {self.background} background")
        return " ".join(words)


def attribute_combinations() -> list[tuple[str, str, str, str]]:
    """Every (colour, size, position, background), in a fixed order."""
    return list(itertools.product(COLOURS, SIZES, POSITIONS, BACKGROUNDS))


def draw_instances(labels: np.ndarray, rng: np.random.Generator) -> list[DigitInstance]:
    """One instance per label: each digit's images take distinct attribute combinations (in a
    random order; repeated only when a digit has more images than combinations)."""
    combos = attribute_combinations()
    instances: list[DigitInstance | None] = [None] * len(labels)
    for label in range(len(CLASS_NAMES)):
        where = np.flatnonzero(labels == label)
        rounds = -(-len(where) // len(combos))  # passes over the combinations
        order = np.concatenate([rng.permutation(len(combos)) for _ in range(rounds)] or [[]])
        for index, combo in zip(where.tolist(), order.tolist(), strict=False):
            instances[index] = DigitInstance(label, *combos[combo])
    return instances  # type: ignore[return-value]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    shift = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return np.clip(np.asarray(rgb) + shift, 0, 255).astype(np.float32)


def render_instance(
    ink: np.ndarray, instance: DigitInstance, image_size: int, rng: np.random.Generator
) -> np.ndarray:
    """The (image_size, image_size, 3) uint8 image of `instance`: `ink` ((side, side) floats in
    [0, 1], the scan at the instance's size) blended in the ink colour over the background."""
    side = ink.shape[0]
    free = image_size - side
    fx, fy = POSITIONS[instance.position]
    x, y = round(fx * free), round(fy * free)
    image = np.empty((image_size, image_size, 3), dtype=np.float32)
    shade = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1)  # brighter or darker, same hue
    image[:] = np.clip(np.asarray(BACKGROUNDS[instance.background]) + shade, 0, 255)
    colour = _jitter(COLOURS[instance.colour], rng)
    alpha = ink[..., None]
    region = image[y : y + side, x : x + side]
    image[y : y + side, x : x + side] = region * (1 - alpha) + colour * alpha
    return image.round().astype(np.uint8)


def digit_side(size: str, image_size: int) -> int:
    """Side in pixels of a digit of `size` ("small", "large") in an image of `image_size`."""
    return max(8, round(SIZES[size] * image_size))


def _inks(image_size: int) -> dict[str, np.ndarray]:
    """{size: (N, side, side) ink in [0, 1]} of every scan (the bilinear rendering of
    `load_digit_images`, inverted)."""
    out = {}
    for size in SIZES:
        images, _ = load_digit_images(digit_side(size, image_size))
        out[size] = 1 - images[..., 0].astype(np.float32) / 255
    return out


def instance_samples(
    *,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    train_renders: int = TRAIN_RENDERS,
    ink_on_paper_share: float = INK_ON_PAPER_SHARE,
    probe_renders: int = PROBE_RENDERS,
) -> Iterator[Sample]:
    """Every scan as an instance sample (keys `instances-NNNNNN` by scan index), with the split
    of the plain demo (`split_indices`, the same `seed`); then `train_renders - 1` more passes
    over the training scans, each scan drawn again in other attributes (keys
    `instances-NNNNNN-rR`, R = 1 ..). A training rendering is drawn in black on white with
    probability `ink_on_paper_share`. Last, split "probe": `probe_renders` passes over the
    validation scans, drawn afresh as the validation split is (keys `instances-NNNNNN-rR`,
    R = 0 ..; `PROBE_RENDERS`). See the module docstring."""
    if image_size < 16:
        raise ValueError(f"image_size={image_size} must be >= 16 pixels for the instance demo")
    if isinstance(train_renders, bool) or not isinstance(train_renders, int) or train_renders < 1:
        raise ValueError(f"train_renders={train_renders!r} must be an int >= 1")
    if not 0 <= ink_on_paper_share <= 1:
        raise ValueError(f"ink_on_paper_share={ink_on_paper_share} must be in [0, 1]")
    if isinstance(probe_renders, bool) or not isinstance(probe_renders, int) or probe_renders < 0:
        raise ValueError(f"probe_renders={probe_renders!r} must be an int >= 0")
    _, labels = load_digit_images(8)
    inks = _inks(image_size)
    splits = split_indices(len(labels), val_fraction, test_fraction, seed=seed)
    split_of = np.empty(len(labels), dtype=object)
    for name, indices in splits.items():
        split_of[indices] = name
    rng = np.random.default_rng(seed)
    for render in range(train_renders):
        instances = draw_instances(labels, rng)
        for index, instance in enumerate(instances):
            split = split_of[index]
            if render and split != "train":
                continue
            if split == "train" and rng.random() < ink_on_paper_share:
                instance = dataclasses.replace(instance, colour="black", background="white")
            key = f"{PREFIX}-{index:06d}" + (f"-r{render}" if render else "")
            yield _sample(key, split, instance, inks[instance.size][index], image_size, rng)
    # the probe split draws from a stream of its own: the splits above stay byte-identical
    probe_rng = np.random.default_rng([seed, PROBE_STREAM])
    for render in range(probe_renders):
        instances = draw_instances(labels, probe_rng)
        for index in splits["val"].tolist():
            instance, key = instances[index], f"{PREFIX}-{index:06d}-r{render}"
            yield _sample(key, "probe", instance, inks[instance.size][index], image_size, probe_rng)


def _sample(
    key: str,
    split: str,
    instance: DigitInstance,
    ink: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
) -> Sample:
    """The shard sample of one rendering (training captions drawn from `rng` after the
    pixels)."""
    image = render_instance(ink, instance, image_size, rng)
    caption = instance.caption()
    meta: dict[str, object] = {
        "label": instance.label,
        "class_name": CLASS_NAMES[instance.label],
        "attributes": {
            "colour": instance.colour,
            "size": instance.size,
            "position": instance.position,
            "background": instance.background,
        },
        "vqa": vqa_pairs(instance.label),
        "split": split,
    }
    if split == "train":
        meta["captions"] = _training_captions(instance, rng)
    else:
        meta["captions"] = [caption]
        meta["zeroshot_captions"] = render_captions(instance.label, HELD_OUT_TEMPLATES)
    png = encode_png(Image.fromarray(image))
    return {"__key__": key, "png": png, "txt": caption, "json": meta}


def instance_count(
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    train_renders: int = TRAIN_RENDERS,
    probe_renders: int = PROBE_RENDERS,
) -> int:
    """How many samples `instance_samples` yields with the same arguments (for progress
    bars): every scan once, the training scans `train_renders - 1` times more and the
    validation scans `probe_renders` times more."""
    _, labels = load_digit_images(8)
    splits = split_indices(len(labels), val_fraction, test_fraction, seed=seed)
    extra = (train_renders - 1) * len(splits["train"]) + probe_renders * len(splits["val"])
    return len(labels) + extra


def _training_captions(instance: DigitInstance, rng: np.random.Generator) -> list[str]:
    """The full caption (word, numeral), one naming the digit and one random attribute, two
    class captions of the plain demo (distinct strings, the full word caption first).

    Among 64 images of a batch, colour, size, position and background alone tell almost every
    pair apart, so captions with every attribute barely teach the digit; the digit-heavy ones
    (three of five) make it the only way to find the image, as in the plain demo.
    """
    captions = [instance.caption(), instance.caption(numeral=True)]
    keep = rng.permutation(4) == 0  # one attribute of the four
    captions.append(
        instance.caption(
            numeral=bool(rng.random() < 0.5),
            colour=bool(keep[0]),
            size=bool(keep[1]),
            position=bool(keep[2]),
            background=bool(keep[3]),
        )
    )
    templates = render_captions(instance.label, CLASS_TEMPLATES)
    for choice in rng.choice(len(templates), size=2, replace=False).tolist():
        captions.append(templates[choice])
    return list(dict.fromkeys(captions))


def instance_corpus() -> list[str]:
    """Texts with every word of the instance captions, for the demo's WordPiece tokenizer:
    the full caption of each attribute combination, the digits taking turns as words and as
    numerals."""
    return [
        DigitInstance(i % len(CLASS_NAMES), *combo).caption(numeral=i % 2 == 1)
        for i, combo in enumerate(attribute_combinations())
    ]
