"""The demo shards: splits, captions, held-out prompts, VQA answers, determinism, the CLI."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimodal.data import DIGIT_NAMES, load_digit_images, split_indices
from multimodal.data.demo import (
    ANNOTATORS,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    VQA_QUESTIONS,
    demo_samples,
    write_demo_shards,
)

ROOT = Path(__file__).resolve().parents[2]


def read_split(folder: Path) -> dict[str, dict]:
    """{key: {"png": bytes, "txt": str, "json": dict, "cls": int}} of one split's shards."""
    samples: dict[str, dict] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                value = {"txt": bytes.decode, "json": json.loads, "cls": int}.get(ext, bytes)(data)
                samples.setdefault(key, {})[ext] = value
    return samples


def all_renderings(templates: tuple[str, ...]) -> set[str]:
    return {t.format(name=DIGIT_NAMES[d], digit=d) for t in templates for d in range(10)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    summaries = write_demo_shards(out, samples_per_shard=200, progress=False)
    return out, summaries


def test_counts_per_split_match_split_indices(demo):
    out, summaries = demo
    expected = split_indices(1797, 0.15, 0.15, seed=0)
    assert set(summaries) == {"train", "val", "test"}
    for split, indices in expected.items():
        summary = summaries[split]
        assert summary.samples == len(indices) and not summary.skipped
        assert len(summary.shards) == math.ceil(len(indices) / 200)
        assert all(p.parent == out / split for p in summary.shards)
        keys = sorted(read_split(out / split))
        assert keys == [f"digits-{i:06d}" for i in indices]


def test_held_out_templates_never_appear_in_training_captions(demo):
    out, _ = demo
    held_out, train_captions = all_renderings(HELD_OUT_TEMPLATES), all_renderings(TRAIN_TEMPLATES)
    assert held_out and not held_out & train_captions
    for sample in read_split(out / "train").values():
        captions = set(sample["json"]["captions"])
        assert sample["txt"] in captions and captions <= train_captions
        assert "zeroshot_captions" not in sample["json"]
    for split in ("val", "test"):
        for sample in read_split(out / split).values():
            meta, label = sample["json"], sample["cls"]
            expected = [t.format(name=DIGIT_NAMES[label], digit=label) for t in HELD_OUT_TEMPLATES]
            assert meta["zeroshot_captions"] == expected
            assert set(expected) <= set(meta["captions"]) and sample["txt"] in train_captions


def test_labels_images_and_vqa_answers(demo):
    out, _ = demo
    images, labels = load_digit_images(32)
    samples = read_split(out / "val")
    seen = set()
    for key, sample in samples.items():
        index, label = int(key.split("-")[1]), sample["cls"]
        meta = sample["json"]
        assert label == labels[index] == meta["label"] and meta["class_name"] == DIGIT_NAMES[label]
        assert meta["split"] == "val"
        answers = {pair["question"]: pair["answers"] for pair in meta["vqa"]}
        assert list(answers) == list(VQA_QUESTIONS)
        assert answers["what digit is this?"] == [DIGIT_NAMES[label]] * ANNOTATORS
        assert answers["is it even?"] == ["yes" if label in (0, 2, 4, 6, 8) else "no"] * 3
        assert answers["is it greater than five?"] == ["yes" if label in (6, 7, 8, 9) else "no"] * 3
        seen.add(label)
        if len(seen) == 1:  # pixels round-trip exactly (PNG is lossless)
            pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
            np.testing.assert_array_equal(pixels, images[index])
    assert seen == set(range(10))
    seven = next(s for s in samples.values() if s["cls"] == 7)
    answers = {pair["question"]: pair["answers"] for pair in seven["json"]["vqa"]}
    assert answers["what digit is this?"] == ["seven"] * 3 and answers["is it even?"] == ["no"] * 3
    assert answers["is it greater than five?"] == ["yes"] * 3
    assert ANNOTATORS == 3


def test_same_seed_gives_identical_bytes(demo, tmp_path):
    out, summaries = demo
    again = write_demo_shards(tmp_path / "again", samples_per_shard=200, progress=False)
    for split, summary in summaries.items():
        twins = again[split].shards
        assert [p.name for p in twins] == [p.name for p in summary.shards]
        for a, b in zip(summary.shards, twins, strict=True):
            assert a.read_bytes() == b.read_bytes()
    other = write_demo_shards(tmp_path / "other", samples_per_shard=200, seed=1, progress=False)
    assert other["val"].shards[0].read_bytes() != summaries["val"].shards[0].read_bytes()


def test_image_size_64():
    sample = next(demo_samples(image_size=64))
    assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)


def test_cli_demo_writes_and_prints_the_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "multimodal", "shards", "demo", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train: 1257 samples in 5 shards" in result.stdout
    assert "val: 270 samples" in result.stdout and "total: 1797 samples" in result.stdout
    assert (tmp_path / "train" / "digits-000004.tar").is_file()


def test_shards_help_is_registered_in_the_multimodal_command(capsys):
    from multimodal.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "demo" in printed and "folder" in printed and "torchvision" in printed
