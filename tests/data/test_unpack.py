"""`multimodal shards unpack`: shards -> a class-per-folder tree that the evaluation's
`imagefolder:` spec reads back with the same images and class names."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from multimodal.data import shards_cli
from multimodal.data.shards import write_shards
from multimodal.eval.datasets import open_samples


def _image(value: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    samples = [
        {"__key__": "a-0", "png": _image(10), "json": {"class_name": "maple tree", "label": 0}},
        {"__key__": "a-1", "jpg": _image(20, "JPEG"), "json": {"class_name": "maple tree"}},
        {"__key__": "a-2", "png": _image(30), "json": {"class_name": "oak", "label": 1}},
        {"__key__": "a-3", "png": _image(40), "cls": 7},  # a label number, no name
        {"__key__": "a-4", "png": _image(50)},  # no class at all
    ]
    for sample in samples:
        sample["txt"] = "a caption"
    write_shards(samples, tmp_path / "shards", prefix="a", max_samples=3, progress=False)
    root = tmp_path / "shards"  # no split in the json: the root itself
    with tarfile.open(root / "z-000000.tar", "w") as tar:  # by hand: the writer needs an image
        data = b'{"class_name": "oak"}'
        member = tarfile.TarInfo("a-5.json")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return samples, root


def test_unpack_writes_each_labelled_image_unchanged_under_its_class(shards, tmp_path, capsys):
    samples, root = shards
    out = tmp_path / "tree"
    assert shards_cli.main(["unpack", str(root), "--out", str(out), "--no-progress"]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["7/a-3.png", "maple_tree/a-0.png", "maple_tree/a-1.jpg", "oak/a-2.png"]
    by_key = {s["__key__"]: s for s in samples}
    for name in files:
        key, ext = name.split("/")[1].split(".")
        assert (out / name).read_bytes() == by_key[key][ext]  # the shard's bytes, unchanged
    printed = capsys.readouterr().out
    assert "unpacked 4 images into 3 class folders" in printed
    assert "skipped 1: no class" in printed and "skipped 1: no image" in printed

    tree = open_samples(f"imagefolder:{out}")  # read back as the evaluation reads it
    assert tree.class_names == ("7", "maple tree", "oak")
    assert len(tree) == 4


def test_unpack_refuses_an_existing_folder_and_missing_shards(shards, tmp_path, capsys):
    _, root = shards
    (tmp_path / "tree").mkdir()
    with pytest.raises(SystemExit) as exit_:
        shards_cli.main(["unpack", str(root), "--out", str(tmp_path / "tree"), "--no-progress"])
    assert exit_.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shards_cli.main(["unpack", str(tmp_path / "none"), "--out", str(tmp_path / "t2")])
    assert "none" in capsys.readouterr().err
