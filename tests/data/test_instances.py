"""The instance-level demo digits: each caption names what its image shows (measured on the
pixels), captions are unique, the split and zero-shot fields are the plain demo's, the shards
are deterministic, and the CLI writes them."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from multimodal.data import DIGIT_NAMES, split_indices
from multimodal.data import instances as inst
from multimodal.data.demo import HELD_OUT_TEMPLATES, VARIANTS, write_demo_shards
from multimodal.data.shards_cli import DEMO_VARIANTS
from tests.data.test_demo import ROOT, read_split

N_CHECKED = 300  # samples whose pixels are measured (of 1,797)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return list(inst.instance_samples())


def expected_caption(label: int, attributes: dict[str, str]) -> str:
    """The caption written out by hand from the attributes (not by DigitInstance.caption)."""
    position = attributes["position"]
    where = "in the center" if position == "center" else f"at the {position}"
    return (
        f"a {attributes['size']} {attributes['colour']} {DIGIT_NAMES[label]} {where} "
        f"on a {attributes['background']} background"
    )


def nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda name: float(np.abs(rgb - np.asarray(table[name])).sum()))


def measured_attributes(image: np.ndarray) -> dict[str, str]:
    """Colour, size, position and background read off the pixels: the background is the most
    frequent colour, ink the pixels far from it (colour: the inkiest pixel), size and position
    from the ink's bounding box against the image side."""
    side = image.shape[0]
    pixels = image.reshape(-1, 3).astype(int)
    values, counts = np.unique(pixels, axis=0, return_counts=True)
    background = values[counts.argmax()]
    distance = np.abs(image.astype(int) - background).sum(-1)  # (H, W)
    ys, xs = np.nonzero(distance > 60)
    ink = image[np.unravel_index(distance.argmax(), distance.shape)].astype(int)
    box = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    centre = ((xs.min() + xs.max()) / 2 / side, (ys.min() + ys.max()) / 2 / side)
    # digit centres: 0.23 / 0.5 / 0.77 of the side (small), 0.35 / 0.5 / 0.65 (large)
    column = "left" if centre[0] < 0.43 else "right" if centre[0] > 0.57 else "middle"
    row = "top" if centre[1] < 0.43 else "bottom" if centre[1] > 0.57 else "middle"
    position = "center" if (row, column) == ("middle", "middle") else f"{row} {column}"
    small, large = (inst.digit_side(s, side) for s in ("small", "large"))
    return {
        "colour": nearest(ink, inst.COLOURS),
        "size": "small" if box <= (small + large) / 2 else "large",
        "position": position,
        "background": nearest(background, inst.BACKGROUNDS),
    }


def test_captions_name_the_rendered_colour_size_position_and_background(samples):
    # the first 300 samples (fixed seed): every attribute of the caption is what the pixels show
    seen = {name: set() for name in ("colour", "size", "position", "background")}
    for sample in samples[:N_CHECKED]:
        meta = sample["json"]
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert image.shape == (inst.IMAGE_SIZE, inst.IMAGE_SIZE, 3)
        measured = measured_attributes(image)
        assert measured == meta["attributes"], sample["__key__"]
        assert sample["txt"] == expected_caption(meta["label"], measured)
        assert meta["class_name"] == DIGIT_NAMES[meta["label"]]
        for name, value in measured.items():
            seen[name].add(value)
    assert seen == {
        "colour": set(inst.COLOURS),
        "size": set(inst.SIZES),
        "position": set(inst.POSITIONS),
        "background": set(inst.BACKGROUNDS),
    }


def test_the_digit_is_the_scan_of_its_label(samples):
    # the ink, cut out and scaled down to 8x8, correlates best with its own scan of all 1,797
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = digits.images.reshape(len(digits.images), 64)
    scans = (scans - scans.mean(1, keepdims=True)) / scans.std(1, keepdims=True)  # (N, 64)
    for index in range(0, len(samples), 97):
        sample = samples[index]
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(float)
        meta = sample["json"]
        background = np.asarray(inst.BACKGROUNDS[meta["attributes"]["background"]], float)
        side = inst.digit_side(meta["attributes"]["size"], inst.IMAGE_SIZE)
        fx, fy = inst.POSITIONS[meta["attributes"]["position"]]
        x, y = round(fx * (inst.IMAGE_SIZE - side)), round(fy * (inst.IMAGE_SIZE - side))
        crop = np.abs(image[y : y + side, x : x + side] - background).sum(-1)
        small = np.asarray(Image.fromarray(crop.astype(np.float32)).resize((8, 8)))
        small = (small.ravel() - small.mean()) / small.std()
        assert int(np.argmax(scans @ small)) == index  # the largest correlation
        assert meta["label"] == digits.target[index]


def test_every_caption_is_unique_and_the_training_captions_vary(samples):
    assert len(samples) == 1797
    assert len({s["txt"] for s in samples}) == len(samples)
    assert len({s["png"] for s in samples}) == len(samples)
    for sample in samples:
        meta, caption = sample["json"], sample["txt"]
        if meta["split"] == "train":
            captions = meta["captions"]
            assert captions[0] == caption and len(captions) == len(set(captions)) >= 3
            numeral = caption.replace(f" {DIGIT_NAMES[meta['label']]} ", f" {meta['label']} ")
            assert numeral in captions
            label = meta["label"]
            plain = {t.format(name=DIGIT_NAMES[label], digit=label) for t in inst.CLASS_TEMPLATES}
            assert len(plain & set(captions)) == 2  # two that name only the digit
            assert not any("small picture" in c for c in captions)
            assert "zeroshot_captions" not in meta
        else:  # retrieval counts exactly this caption
            assert meta["captions"] == [caption]
            assert meta["zeroshot_captions"] == [
                t.format(name=DIGIT_NAMES[meta["label"]], digit=meta["label"])
                for t in HELD_OUT_TEMPLATES
            ]


def test_the_split_is_the_plain_demo_split(samples):
    expected = split_indices(1797, 0.15, 0.15, seed=0)
    for split, indices in expected.items():
        keys = [s["__key__"] for s in samples if s["json"]["split"] == split]
        assert keys == [f"instances-{i:06d}" for i in indices]


def test_attribute_combinations_are_distinct_within_each_digit():
    labels = np.repeat(np.arange(10), 200)  # 200 images a digit, 210 combinations
    drawn = inst.draw_instances(labels, np.random.default_rng(0))
    for label in range(10):
        combos = [(d.colour, d.size, d.position, d.background) for d in drawn if d.label == label]
        assert len(combos) == len(set(combos)) == 200
    assert len(inst.attribute_combinations()) == 210
    more = inst.draw_instances(np.zeros(300, dtype=int), np.random.default_rng(0))
    counts = {}
    for d in more:  # past 210 images the combinations repeat, at most twice each
        key = (d.colour, d.size, d.position, d.background)
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 210 and max(counts.values()) == 2


def test_bad_instances_name_the_field():
    with pytest.raises(ValueError, match="DigitInstance.colour='pink'"):
        inst.DigitInstance(3, "pink", "small", "center", "grey")
    with pytest.raises(ValueError, match="DigitInstance.label=10"):
        inst.DigitInstance(10, "red", "small", "center", "grey")
    with pytest.raises(ValueError, match="image_size=12"):
        next(inst.instance_samples(image_size=12))
    with pytest.raises(ValueError, match="variant='instance'"):
        write_demo_shards("unused", variant="instance")
    assert DEMO_VARIANTS == VARIANTS


def test_same_seed_same_samples_other_seed_other_captions(samples):
    again = list(inst.instance_samples())
    assert [s["png"] for s in again] == [s["png"] for s in samples]
    assert [s["json"] for s in again] == [s["json"] for s in samples]
    other = list(itertools.islice(inst.instance_samples(seed=1), 20))
    assert [s["txt"] for s in other] != [s["txt"] for s in samples[:20]]


def test_the_cli_writes_the_instance_shards_and_tokenizer(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "multimodal", "shards", "demo", "--variant", "instances",
         "--image-size", "40", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    splits = split_indices(1797, 0.15, 0.15, seed=0)
    for split, indices in splits.items():
        written = read_split(out / split)
        assert sorted(written) == [f"instances-{i:06d}" for i in indices]
    sample = read_split(out / "test")[f"instances-{splits['test'][0]:06d}"]
    assert Image.open(io.BytesIO(sample["png"])).size == (40, 40)
    assert sample["json"]["captions"] == [sample["txt"]]
    assert (out / "tokenizer").is_dir()
