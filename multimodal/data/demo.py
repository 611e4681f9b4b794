"""The demo dataset: the bundled digits as webdataset shards with captions and VQA pairs.

scikit-learn's 1,797 digit scans (`load_digit_images`, no download) are written as PNG images
with the deterministic 70/15/15 split of `split_indices` (the same as `DigitsDataModule`).
Training captions come from `TRAIN_TEMPLATES` only; validation and test samples also carry
the renderings of `HELD_OUT_TEMPLATES` in `json["zeroshot_captions"]`, so zero-shot
classification can be measured with prompts the model never saw. Every sample has VQA pairs
(`VQA_QUESTIONS`, answers as words), `label` and `class_name`. The same seed gives
byte-identical shards.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from multimodal.data.digits import DIGIT_NAMES, load_digit_images, split_indices
from multimodal.data.shards import Sample, WriteSummary, encode_png, write_shards
from text.tokenizer import Tokenizer, train_tokenizer

CLASS_NAMES = DIGIT_NAMES
NUMBER_WORDS = (*DIGIT_NAMES, "ten")
# `{name}` is the digit's word ("seven"), `{digit}` its numeral ("7")
TRAIN_TEMPLATES = (
    "a photo of the number {name}",
    "a handwritten {digit}",
    "the digit {name}",
    "a scan of a handwritten {name}",
    "an image of the number {digit}",
    "a small picture of a {name}",
)
HELD_OUT_TEMPLATES = (
    "a drawing of the digit {digit}",
    "a low resolution scan of the number {name}",
)
_ANSWERS: dict[str, Callable[[int], str]] = {
    "what digit is this?": lambda label: DIGIT_NAMES[label],
    "is it even?": lambda label: "yes" if label % 2 == 0 else "no",
    "is it greater than five?": lambda label: "yes" if label > 5 else "no",
    "is it less than three?": lambda label: "yes" if label < 3 else "no",
    "what is this number plus one?": lambda label: NUMBER_WORDS[label + 1],
}
VQA_QUESTIONS = tuple(_ANSWERS)
ANNOTATORS = 3  # VQA scores an answer min(#annotators giving it / 3, 1)
PREFIX = "digits"
VARIANTS = ("digits", "instances")  # see write_demo_shards
DEMO_SIZE = 1797  # scans in scikit-learn's digits


def render_captions(label: int, templates: tuple[str, ...]) -> list[str]:
    """The captions of a digit from templates: word for `{name}`, numeral for `{digit}`."""
    return [t.format(name=DIGIT_NAMES[label], digit=label) for t in templates]


def vqa_pairs(label: int) -> list[dict[str, object]]:
    """The question-answer pairs of a digit, in the shard format: each answer given by
    `ANNOTATORS` annotators (the VQA soft score of the answer is then 1)."""
    return [
        {"question": q, "answers": [a] * ANNOTATORS}
        for q, a in zip(VQA_QUESTIONS, _answers(label), strict=True)
    ]


def demo_samples(
    *,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> Iterator[Sample]:
    """All digits as shard samples (keys `digits-NNNNNN` by scan index), split by `seed`.

    A sample's `txt` is one of its TRAIN_TEMPLATES captions, chosen with `seed`.
    """
    images, labels = load_digit_images(image_size)
    return _samples(images, labels, seed, val_fraction, test_fraction)


def _samples(
    images: np.ndarray, labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float
) -> Iterator[Sample]:
    splits = split_indices(len(labels), val_fraction, test_fraction, seed=seed)
    split_of = np.empty(len(labels), dtype=object)
    for name, indices in splits.items():
        split_of[indices] = name
    choices = np.random.default_rng(seed).integers(len(TRAIN_TEMPLATES), size=len(labels))
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        captions = render_captions(label, TRAIN_TEMPLATES)
        txt = captions[choices[index]]
        meta: dict[str, object] = {
            "label": label,
            "class_name": CLASS_NAMES[label],
            "vqa": vqa_pairs(label),
            "split": split_of[index],
        }
        if split_of[index] != "train":
            zeroshot = render_captions(label, HELD_OUT_TEMPLATES)
            captions += zeroshot
            meta["zeroshot_captions"] = zeroshot
        meta["captions"] = captions
        png = encode_png(Image.fromarray(image))
        yield {"__key__": f"{PREFIX}-{index:06d}", "png": png, "txt": txt, "json": meta}


TOKENIZER_DIR = "tokenizer"
TOKENIZER_VOCAB = 256


def demo_corpus() -> list[str]:
    """Every text a model is trained on in the demo: the training captions of each digit,
    the VQA questions and their answers (the held-out templates are left out)."""
    texts = [
        c for label in range(len(CLASS_NAMES)) for c in render_captions(label, TRAIN_TEMPLATES)
    ]
    texts += list(VQA_QUESTIONS)
    texts += [a for label in range(len(CLASS_NAMES)) for a in _answers(label)]
    return texts


def _answers(label: int) -> list[str]:
    return [answer(label) for answer in _ANSWERS.values()]


def write_demo_tokenizer(out_dir: str | os.PathLike, extra_texts: Sequence[str] = ()) -> Tokenizer:
    """Train a small WordPiece tokenizer on `demo_corpus()` (and `extra_texts`, e.g. the
    instance captions) and save it to `out_dir/tokenizer` (a few dozen ids: captioning and VQA
    decoders need no 49k-way softmax). Word ids are `[PAD]` 0, `[CLS]` (start) and `[SEP]`
    (end) as in BERT."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        texts = [*demo_corpus(), *extra_texts]
        corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
        tokenizer = train_tokenizer(
            [corpus], kind="wordpiece", vocab_size=TOKENIZER_VOCAB, min_frequency=1
        )
    tokenizer.save(Path(out_dir) / TOKENIZER_DIR)
    return tokenizer


def write_demo_shards(
    out_dir: str | os.PathLike,
    *,
    variant: str = "digits",
    image_size: int | None = None,
    samples_per_shard: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, WriteSummary]:
    """Write the demo digits to `out_dir/{train,val,test}/digits-NNNNNN.tar` (variant
    "instances": `instances-NNNNNN.tar`, see `multimodal.data.instances`), and the demo's
    small WordPiece tokenizer to `out_dir/tokenizer` (`write_demo_tokenizer`).

    Args:
        out_dir: root folder of the three shard series.
        variant: "digits" (dark digits on white, captions that name the digit) or "instances"
            (coloured digits placed and sized at random, captions that name all of it).
        image_size: side of the rendered images in pixels (digits: 32, 64 for larger towers;
            instances: 32).
        samples_per_shard: most samples per shard (the last one of a split holds the rest).
        seed: the split and the choice of each sample's `txt`.
        overwrite: replace a demo already written to `out_dir`.
        progress: show a progress bar.
    """
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int):
        raise ValueError(f"samples_per_shard={samples_per_shard!r} must be an int >= 1")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {list(VARIANTS)}")
    extra_texts: list[str] = []
    total = DEMO_SIZE
    if variant == "instances":
        from multimodal.data import instances  # imports this module

        samples = instances.instance_samples(
            image_size=image_size or instances.IMAGE_SIZE, seed=seed
        )
        prefix, extra_texts = instances.PREFIX, instances.instance_corpus()
        total = instances.instance_count(seed=seed)
    else:
        image_size = image_size or 32
        if image_size < 8:
            raise ValueError(f"image_size={image_size} must be >= 8 pixels (the scans are 8x8)")
        images, labels = load_digit_images(image_size)
        samples, prefix = _samples(images, labels, seed, 0.15, 0.15), PREFIX
    summaries = write_shards(
        samples,
        out_dir,
        prefix=prefix,
        max_samples=samples_per_shard,
        overwrite=overwrite,
        progress=progress,
        total=total,
    )
    write_demo_tokenizer(out_dir, extra_texts)
    return summaries
