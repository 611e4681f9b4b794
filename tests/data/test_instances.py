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
    return (
        f"a {attributes['size']} {attributes['colour']} {DIGIT_NAMES[label]} at the "
        f"{attributes['position']} on a {attributes['background']} background"
    )


def nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda name: float(np.abs(rgb - np.asarray(table[name])).sum()))


def ink_colour(pixel: np.ndarray, background: np.ndarray) -> str:
    """The ink whose blend with the background passes nearest `pixel`: a stroke pixel is
    background + alpha * (ink - background), and at 16 px even the inkiest pixel of a scan
    may have alpha < 1 (black ink then reads as a dark grey, nearer brown than black)."""

    def residual(name: str) -> float:
        direction = np.asarray(inst.COLOURS[name], float) - background
        alpha = np.clip((pixel - background) @ direction / (direction @ direction), 0, 1)
        return float(np.abs(pixel - background - alpha * direction).sum())

    return min(inst.COLOURS, key=residual)


def measured_attributes(image: np.ndarray) -> dict[str, str]:
    """Colour, size, position and background read off the pixels: the background is the most
    frequent colour, ink the pixels far from it (colour: the inkiest pixel, `ink_colour`),
    size and position from the ink's bounding box against the image side."""
    side = image.shape[0]
    pixels = image.reshape(-1, 3).astype(int)
    values, counts = np.unique(pixels, axis=0, return_counts=True)
    background = values[counts.argmax()]
    distance = np.abs(image.astype(int) - background).sum(-1)  # (H, W)
    ys, xs = np.nonzero(distance > 60)
    ink = image[np.unravel_index(distance.argmax(), distance.shape)].astype(int)
    box = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    # the ink's centre of mass: the scans are centred in their box, whose centre is at 0.25 /
    # 0.75 of the side (small) or 0.375 / 0.625 (large, only 8 px from one corner to the other)
    weights = distance / distance.sum()
    grid = (np.arange(side) + 0.5) / side
    centre = ((weights.sum(0) * grid).sum(), (weights.sum(1) * grid).sum())
    column = "left" if centre[0] < 0.5 else "right"
    row = "top" if centre[1] < 0.5 else "bottom"
    position = f"{row} {column}"
    small, large = (inst.digit_side(s, side) for s in ("small", "large"))
    return {
        "colour": ink_colour(ink.astype(float), background.astype(float)),
        "size": "small" if box <= (small + large) / 2 else "large",
        "position": position,
        "background": nearest(background, inst.BACKGROUNDS),
    }


def test_captions_name_the_rendered_colour_size_position_and_background(samples):
    # the first 300 samples and 100 of the probe split (fixed seed): every attribute of the
    # caption is what the pixels show
    seen = {name: set() for name in ("colour", "size", "position", "background")}
    probe = [s for s in samples if s["json"]["split"] == "probe"]
    for sample in samples[:N_CHECKED] + probe[:100]:
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
    for sample in samples[::97]:  # first renderings and training re-renderings
        index = int(sample["__key__"].split("-")[1])  # the scan
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
    renders = (inst.TRAIN_RENDERS - 1) * 1257 + inst.PROBE_RENDERS * 270
    assert len(samples) == inst.instance_count() == 1797 + renders
    held_out = [s for s in samples if s["json"]["split"] in ("val", "test")]
    assert len({s["txt"] for s in held_out}) == len(held_out) == 540  # retrieval's captions
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


def test_training_renders_each_scan_several_times_a_share_in_black_on_white(samples):
    train = [s for s in samples if s["json"]["split"] == "train"]
    by_scan: dict[str, list[dict]] = {}
    for sample in train:
        by_scan.setdefault(sample["__key__"][: len("instances-000000")], []).append(sample)
    assert len(by_scan) == 1257
    assert {len(renders) for renders in by_scan.values()} == {inst.TRAIN_RENDERS}
    for scan, renders in by_scan.items():
        keys = [s["__key__"] for s in renders]
        assert keys == [scan] + [f"{scan}-r{r}" for r in range(1, inst.TRAIN_RENDERS)]
        assert len({s["json"]["label"] for s in renders}) == 1
    on_paper = [
        s["json"]["attributes"]["colour"] == "black"
        and s["json"]["attributes"]["background"] == "white"
        for s in train
    ]
    # drawn with probability INK_ON_PAPER_SHARE, plus the uniform draws that land there (1/28)
    expected = inst.INK_ON_PAPER_SHARE + (1 - inst.INK_ON_PAPER_SHARE) / 28
    assert abs(np.mean(on_paper) - expected) < 0.02
    held_out = [s["json"]["attributes"] for s in samples if s["json"]["split"] != "train"]
    share = np.mean([a["colour"] == "black" and a["background"] == "white" for a in held_out])
    assert share < 0.1  # evaluation draws every combination alike
    none = list(inst.instance_samples(train_renders=1, ink_on_paper_share=0.0, probe_renders=0))
    assert len(none) == 1797
    with pytest.raises(ValueError, match="train_renders=0"):
        next(inst.instance_samples(train_renders=0))
    with pytest.raises(ValueError, match="ink_on_paper_share=1.5"):
        next(inst.instance_samples(ink_on_paper_share=1.5))


def test_the_probe_split_draws_each_validation_scan_afresh(samples):
    val = {s["__key__"]: s for s in samples if s["json"]["split"] == "val"}
    probe = [s for s in samples if s["json"]["split"] == "probe"]
    assert len(probe) == inst.PROBE_RENDERS * len(val) == 2160
    by_scan: dict[str, list[dict]] = {}
    for sample in probe:
        by_scan.setdefault(sample["__key__"].rsplit("-r", 1)[0], []).append(sample)
    assert set(by_scan) == set(val)  # the validation scans, none of train or test
    for scan, renders in by_scan.items():
        assert [s["__key__"] for s in renders] == [f"{scan}-r{r}" for r in range(8)]
        assert {s["json"]["label"] for s in renders} == {val[scan]["json"]["label"]}
        for sample in renders:  # captioned and prompted as validation samples are
            meta = sample["json"]
            assert meta["captions"] == [sample["txt"]] and "zeroshot_captions" in meta
    pixels = {s["png"] for s in samples if s["json"]["split"] != "probe"}
    assert not pixels & {s["png"] for s in probe}
    attributes = [s["json"]["attributes"] for s in probe]
    share = np.mean([a["colour"] == "black" and a["background"] == "white" for a in attributes])
    assert share < 0.1  # drawn as the evaluation splits are, not as training
    # a stream of its own: without the probe split every other sample is byte-identical
    without = list(inst.instance_samples(probe_renders=0))
    assert [(s["__key__"], s["png"], s["json"]) for s in without] == [
        (s["__key__"], s["png"], s["json"]) for s in samples[: len(without)]
    ]
    assert len(without) == inst.instance_count(probe_renders=0) == len(samples) - 2160
    with pytest.raises(ValueError, match="probe_renders=-1"):
        next(inst.instance_samples(probe_renders=-1))


def test_the_split_is_the_plain_demo_split(samples):
    expected = split_indices(1797, 0.15, 0.15, seed=0)
    for split, indices in expected.items():  # the first rendering of each scan
        keys = [s["__key__"] for s in samples if s["json"]["split"] == split]
        assert [k for k in keys if "-r" not in k] == [f"instances-{i:06d}" for i in indices]


def test_attribute_combinations_are_distinct_within_each_digit():
    labels = np.repeat(np.arange(10), 200)  # 200 images a digit, 224 combinations
    drawn = inst.draw_instances(labels, np.random.default_rng(0))
    for label in range(10):
        combos = [(d.colour, d.size, d.position, d.background) for d in drawn if d.label == label]
        assert len(combos) == len(set(combos)) == 200
    assert len(inst.attribute_combinations()) == 224
    more = inst.draw_instances(np.zeros(300, dtype=int), np.random.default_rng(0))
    counts = {}
    for d in more:  # past 224 images the combinations repeat, at most twice each
        key = (d.colour, d.size, d.position, d.background)
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 224 and max(counts.values()) == 2


def test_bad_instances_name_the_field():
    with pytest.raises(ValueError, match="DigitInstance.colour='pink'"):
        inst.DigitInstance(3, "pink", "small", "top left", "grey")
    with pytest.raises(ValueError, match="DigitInstance.label=10"):
        inst.DigitInstance(10, "red", "small", "top left", "grey")
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
        written = [k for k in read_split(out / split) if "-r" not in k]  # first renderings
        assert sorted(written) == [f"instances-{i:06d}" for i in indices]
    probe = read_split(out / "probe")
    assert sorted({k.rsplit("-r", 1)[0] for k in probe}) == [
        f"instances-{i:06d}" for i in sorted(splits["val"])
    ]
    sample = read_split(out / "test")[f"instances-{splits['test'][0]:06d}"]
    assert Image.open(io.BytesIO(sample["png"])).size == (40, 40)
    assert sample["json"]["captions"] == [sample["txt"]]
    assert (out / "tokenizer").is_dir()
