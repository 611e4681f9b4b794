"""The shard writer: round trip, limits, atomic writes, skipped inputs, sources and the CLI."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from multimodal.data import shards_cli
from multimodal.data.shards import (
    ShardWriter,
    Skipped,
    WriteSummary,
    samples_from_classification,
    samples_from_image_folder,
    write_shards,
)


def encoded(color: tuple[int, int, int], fmt: str = "PNG", size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt)
    return buffer.getvalue()


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of one shard, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_series(paths: list[Path]) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for path in paths:
        out.update(read_tar(path))
    return out


def blob_sample(key: str, n_bytes: int, seed: int = 0) -> dict:
    """A sample whose png is `n_bytes` long (a PNG signature and random bytes)."""
    data = b"\x89PNG\r\n\x1a\n" + np.random.default_rng(seed).bytes(n_bytes - 8)
    return {"__key__": key, "png": data, "txt": f"caption {key}"}


def listing(folder: Path) -> list[str]:
    """Files in the folder, except the manifest a completed series ends with."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".manifest.json"))


def test_round_trip_bytes_captions_and_json(tmp_path):
    written = [
        {
            "__key__": "a-000000",
            "png": encoded((255, 0, 0)),
            "txt": "a red square",
            "json": {"label": 3, "class_name": "red", "captions": ["a red square", "red"]},
        },
        {
            "__key__": "a-000001",
            "jpg": encoded((0, 0, 255), "JPEG"),
            "txt": "un carré bleu",  # UTF-8 survives
            "json": {
                "vqa": [{"question": "what colour?", "answers": ["blue"]}],
                "split": "x",
                "extra": {"source": "b.jpg"},
            },
            "cls": 7,
        },
    ]
    with ShardWriter(tmp_path, "a") as writer:
        for sample in written:
            writer.write(sample)
    summary = writer.summary
    assert summary.samples == 2 and summary.shards == [tmp_path / "a-000000.tar"]
    assert summary.bytes == (tmp_path / "a-000000.tar").stat().st_size
    assert listing(tmp_path) == ["a-000000.tar"]

    back = read_tar(tmp_path / "a-000000.tar")
    assert list(back) == ["a-000000", "a-000001"]
    first, second = back["a-000000"], back["a-000001"]
    assert set(first) == {"png", "txt", "json", "cls"}  # cls added from json["label"]
    assert first["png"] == written[0]["png"] and second["jpg"] == written[1]["jpg"]
    assert first["txt"].decode() == "a red square"
    assert second["txt"].decode("utf-8") == "un carré bleu"
    assert json.loads(first["json"]) == written[0]["json"]
    assert json.loads(second["json"]) == written[1]["json"]
    assert first["cls"] == b"3" and second["cls"] == b"7"

    # webdataset itself reads the same samples
    dataset = wds.WebDataset(str(tmp_path / "a-000000.tar"), shardshuffle=False)
    read = {s["__key__"]: s for s in dataset}
    assert read["a-000001"]["jpg"] == written[1]["jpg"]
    assert read["a-000000"]["txt"].decode() == "a red square"


def test_max_samples_starts_new_shards(tmp_path):
    with ShardWriter(tmp_path, "s", max_samples=3) as writer:
        for i in range(10):
            writer.write(blob_sample(f"k{i}", 100, seed=i))
    names = [p.name for p in writer.summary.shards]
    assert names == [f"s-{i:06d}.tar" for i in range(4)]
    assert [len(read_tar(p)) for p in writer.summary.shards] == [3, 3, 3, 1]
    assert str(writer.summary.pattern).endswith("s-{000000..000003}.tar")


def test_max_bytes_is_honoured_and_a_big_sample_gets_its_own_shard(tmp_path):
    max_bytes = 40 * 1024
    sizes = [3000, 9000, 5000, 12000, 100_000, 700, 20000, 8000, 8000, 8000, 3000]
    samples = [blob_sample(f"k{i}", n, seed=i) for i, n in enumerate(sizes)]
    with ShardWriter(tmp_path, "b", max_bytes=max_bytes) as writer:
        for sample in samples:
            writer.write(sample)
    shards = writer.summary.shards
    on_disk = [p.stat().st_size for p in shards]
    assert writer.summary.bytes == sum(on_disk)
    contents = [read_tar(p) for p in shards]
    for size, content in zip(on_disk, contents, strict=True):
        assert size <= max_bytes or len(content) == 1
    assert [list(c) for c in contents if "k4" in c] == [["k4"]]  # 100 kB: alone
    assert read_series(shards) == {
        s["__key__"]: {"png": s["png"], "txt": s["txt"].encode()} for s in samples
    }
    # the limit is what splits the shards: one shard when it is large enough
    with ShardWriter(tmp_path / "one", "b", max_bytes=1 << 20) as writer:
        for sample in samples:
            writer.write(sample)
    assert len(writer.summary.shards) == 1


def test_an_open_shard_only_exists_under_its_temporary_name(tmp_path):
    writer = ShardWriter(tmp_path, "t")
    writer.write(blob_sample("k0", 100))
    assert listing(tmp_path) == [".t-000000.tar.tmp"]  # a crash now leaves no final name
    writer.close()
    assert listing(tmp_path) == ["t-000000.tar"]


def test_exception_inside_with_leaves_no_shard_and_no_partial_file(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, "e", max_samples=2) as w:
        for i in range(5):
            w.write(blob_sample(f"k{i}", 100))
        assert len(w.summary.shards) == 2  # two finished shards, a third open
        raise RuntimeError("boom")
    assert listing(tmp_path) == []


def test_crash_when_renaming_leaves_no_shard_and_no_partial_file(tmp_path, monkeypatch):
    def crash(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"), ShardWriter(tmp_path, "c") as writer:
        writer.write(blob_sample("k0", 100))
    assert listing(tmp_path) == []


def test_write_shards_removes_every_series_on_error(tmp_path):
    def samples():
        yield {**blob_sample("k0", 100), "json": {"split": "train"}}
        yield {**blob_sample("k1", 100), "json": {"split": "val"}}
        yield {**blob_sample("k2", 100), "pyd": b"pickled"}

    with pytest.raises(ValueError, match="pyd"):
        write_shards(samples(), tmp_path, prefix="w", max_samples=1, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


def test_duplicate_key_raises(tmp_path):
    with (
        pytest.raises(ValueError, match="'k0' was already written"),
        ShardWriter(tmp_path, "d") as w,
    ):
        w.write(blob_sample("k0", 100))
        w.write(blob_sample("k0", 100))
    splits = [
        {**blob_sample("k0", 100), "json": {"split": "train"}},
        {**blob_sample("k0", 100), "json": {"split": "val"}},
    ]
    with pytest.raises(ValueError, match="already written"):  # across splits too
        write_shards(splits, tmp_path / "s", prefix="d", progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pyd": b"x"}, "pyd"),
        ({"__key__": "a.b"}, "__key__"),
        ({"png": b"not a png"}, "encoded png"),
        ({"txt": ""}, "txt"),
        ({"json": {"label": 1}, "cls": 2}, "differs"),
        ({"json": {"captions": ["another caption"]}}, "must include txt"),
        ({"json": {"label": "one"}}, "label"),
        ({"json": {"vqa": [{"question": "q", "answers": "yes"}]}}, "vqa"),
        ({"json": b"[1, 2]"}, "JSON object"),
        ({"json": {"extra": np.float32(1.0)}}, "not JSON-serialisable"),
        ({"jpg": encoded((0, 0, 0), "JPEG")}, "exactly one image"),
    ],
)
def test_invalid_samples_name_the_problem(tmp_path, change, message):
    with pytest.raises(ValueError, match=message), ShardWriter(tmp_path, "v") as writer:
        writer.write({**blob_sample("k0", 100), **change})
    assert listing(tmp_path) == []


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="max_samples=0"):
        ShardWriter(tmp_path, "x", max_samples=0)
    with pytest.raises(ValueError, match="max_bytes=100 must be an int >= 10240"):
        ShardWriter(tmp_path, "x", max_bytes=100)
    with pytest.raises(ValueError, match="prefix='a.b'"):
        ShardWriter(tmp_path, "a.b")


def test_existing_shards_need_overwrite_and_stale_ones_are_removed(tmp_path):
    samples = [blob_sample(f"k{i}", 100) for i in range(5)]
    with ShardWriter(tmp_path, "o", max_samples=1) as writer:
        for sample in samples:
            writer.write(sample)
    with pytest.raises(FileExistsError, match="overwrite"):
        ShardWriter(tmp_path, "o")
    with ShardWriter(tmp_path, "o", max_samples=2, overwrite=True) as writer:
        for sample in samples[:3]:
            writer.write(sample)
    assert listing(tmp_path) == ["o-000000.tar", "o-000001.tar"]
    assert list(read_series(writer.summary.shards)) == ["k0", "k1", "k2"]


# ---------------------------------------------------------------------------------------------
# sources


def make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "red.png": encoded((255, 0, 0)),
        "sub/blue.jpg": encoded((0, 0, 255), "JPEG"),
        "green.bmp": encoded((0, 255, 0), "BMP"),
        "corrupt.png": encoded((1, 2, 3))[:40],  # truncated
        "garbage.jpg": b"this is not an image",
        "uncaptioned.png": encoded((9, 9, 9)),
        "empty_caption.png": encoded((8, 8, 8)),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


CAPTIONS = [
    ("red.png", "a red square"),
    ("sub/blue.jpg", "a blue square"),
    ("sub/blue.jpg", "something blue"),
    ("green.bmp", "a green square"),
    ("missing.png", "never on disk"),
    ("corrupt.png", "a broken file"),
    ("garbage.jpg", "not an image"),
    ("empty_caption.png", ""),
]


def write_captions(path: Path) -> None:
    if path.suffix == ".csv":
        lines = ["image,caption"] + [f"{image},{caption}" for image, caption in CAPTIONS]
        path.write_text("\n".join(lines) + "\n")
    else:
        rows = [json.dumps({"image": image, "caption": caption}) for image, caption in CAPTIONS]
        path.write_text("\n".join([*rows, "{not json", '{"caption": "no image"}']) + "\n")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_image_folder_skips_bad_inputs_with_reasons_and_writes_the_rest(tmp_path, suffix):
    images = tmp_path / "images"
    files = make_folder(images)
    captions = tmp_path / f"captions{suffix}"
    write_captions(captions)
    summaries = write_shards(
        samples_from_image_folder(images, captions, split="train"),
        tmp_path / "out",
        prefix="img",
        progress=False,
    )
    summary = summaries["train"]
    assert set(summaries) == {"train"} and summary.samples == 3
    reasons = dict(summary.skipped)
    assert "not found" in reasons["missing.png"]
    assert "not a readable image" in reasons["corrupt.png"]
    assert "not a readable image" in reasons["garbage.jpg"]
    assert reasons["uncaptioned.png"] == reasons["empty_caption.png"] == "image without caption"
    if suffix == ".jsonl":
        assert len(summary.skipped) == 7
        assert "invalid JSON" in reasons["captions.jsonl:9"] and "captions.jsonl:10" in reasons
    else:
        assert len(summary.skipped) == 5
    assert "skipped" in str(summary) and "missing.png" in str(summary)

    back = read_series(summary.shards)
    by_source = {json.loads(s["json"])["source"]: s for s in back.values()}
    assert set(by_source) == {"red.png", "sub/blue.jpg", "green.bmp"}
    assert by_source["red.png"]["png"] == files["red.png"]  # written as it is
    assert by_source["sub/blue.jpg"]["jpg"] == files["sub/blue.jpg"]
    blue = json.loads(by_source["sub/blue.jpg"]["json"])
    assert blue["captions"] == ["a blue square", "something blue"] and blue["split"] == "train"
    assert by_source["sub/blue.jpg"]["txt"].decode() == "a blue square"
    green = Image.open(io.BytesIO(by_source["green.bmp"]["png"]))  # BMP re-encoded as PNG
    assert green.format == "PNG" and green.getpixel((0, 0)) == (0, 255, 0)


def test_image_folder_split_by_index_is_deterministic(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["image,caption"]
    for i in range(20):
        (images / f"{i}.png").write_bytes(encoded((i, i, i)))
        rows.append(f"{i}.png,image {i}")
    (tmp_path / "c.csv").write_text("\n".join(rows))

    def keys_by_split() -> dict[str, set[str]]:
        samples = samples_from_image_folder(
            images, tmp_path / "c.csv", val_fraction=0.2, test_fraction=0.1, seed=3
        )
        out: dict[str, set[str]] = {}
        for sample in samples:
            out.setdefault(sample["json"]["split"], set()).add(sample["__key__"])
        return out

    first = keys_by_split()
    assert first == keys_by_split()
    assert {k: len(v) for k, v in first.items()} == {"train": 14, "val": 4, "test": 2}


def test_image_folder_arguments_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_dir"):
        samples_from_image_folder(tmp_path / "nope", tmp_path / "c.csv")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        samples_from_image_folder(tmp_path, tmp_path / "c.txt")
    (tmp_path / "c.csv").write_text("file,text\na.png,b\n")
    with pytest.raises(ValueError, match="image,caption"):
        samples_from_image_folder(tmp_path, tmp_path / "c.csv")


class ToyDataset:
    """(image, label) items: PIL, array, a bad label, and an item that raises."""

    def __init__(self) -> None:
        self.items = [
            (Image.new("RGB", (6, 6), (10, 20, 30)), 1),
            (np.full((5, 5, 3), 200, dtype=np.uint8), np.int64(0)),
            (Image.new("L", (4, 4), 7), 5),
            None,
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        if self.items[index] is None:
            raise OSError("unreadable file")
        return self.items[index]


def test_classification_source_uses_templates_and_skips_bad_items(tmp_path):
    templates = ["a photo of a {}.", "a drawing of a {}."]
    samples = samples_from_classification(ToyDataset(), ["cat", "dog"], templates, key_prefix="toy")
    summaries = write_shards(samples, tmp_path, prefix="toy", progress=False)
    summary = summaries["all"]
    assert summary.samples == 2 and summary.shards == [tmp_path / "toy-000000.tar"]
    assert [s for s, _ in summary.skipped] == ["toy[2]", "toy[3]"]
    assert "label 5 outside 0..1" in summary.skipped[0][1]
    assert "unreadable file" in summary.skipped[1][1]
    back = read_tar(summary.shards[0])
    dog = back["toy-000000"]
    assert dog["txt"].decode() == "a photo of a dog." and dog["cls"] == b"1"
    assert json.loads(dog["json"]) == {
        "label": 1,
        "class_name": "dog",
        "captions": ["a photo of a dog.", "a drawing of a dog."],
    }
    pixels = np.asarray(Image.open(io.BytesIO(back["toy-000001"]["png"])))
    assert pixels.shape == (5, 5, 3) and (pixels == 200).all()
    with pytest.raises(ValueError, match="template"):
        samples_from_classification(ToyDataset(), ["cat", "dog"], ["no placeholder"])


def test_summary_reads_well():
    summary = WriteSummary(samples=3, shards=[Path("d/x-000000.tar")], bytes=20480, name="val")
    summary.skipped.append(("a.png", "image file not found"))
    text = str(summary)
    assert text.startswith("val: 3 samples in 1 shard, 20.0 KiB")
    assert "d/x-000000.tar" in text and "a.png: image file not found" in text
    assert Skipped("a", "b").split is None


# ---------------------------------------------------------------------------------------------
# the command line (in process; the subprocess run is in test_demo.py)


def write_mnist(root: Path, n_train: int = 12, n_test: int = 5) -> None:
    """A tiny dataset in MNIST's idx format, where torchvision.datasets.MNIST looks for it."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        header = struct.pack(">IIII", 0x803, n, 28, 28)
        (raw / f"{name}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{name}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + labels.tobytes()
        )


def test_cli_torchvision_writes_train_val_test(tmp_path, capsys):
    write_mnist(tmp_path / "data")
    out = tmp_path / "out"
    argv = [
        "torchvision",
        "--dataset",
        "MNIST",
        "--root",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    assert shards_cli.main([*argv, "--val-fraction", "0.25", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train: 9 samples" in printed and "val: 3 samples" in printed
    assert "test: 5 samples" in printed and "total: 17 samples" in printed
    sample = read_tar(out / "test" / "mnist-000000.tar")["mnist-test-000003"]
    assert sample["txt"].decode() == "a photo of a three." and sample["cls"] == b"3"


def test_cli_torchvision_missing_dataset_is_a_clear_error(tmp_path, capsys):
    argv = ["torchvision", "--dataset", "CIFAR10", "--root", str(tmp_path), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        shards_cli.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "CIFAR10 was not found" in error and "downloads nothing" in error
    assert "Traceback" not in error


def test_cli_folder(tmp_path, capsys):
    images = tmp_path / "images"
    make_folder(images)
    write_captions(tmp_path / "c.csv")
    argv = ["folder", "--images", str(images), "--captions", str(tmp_path / "c.csv")]
    argv += ["--out", str(tmp_path / "out"), "--max-samples", "2", "--no-progress"]
    assert shards_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 3 samples in 2 shards" in printed and "skipped 5 inputs" in printed
    assert listing(tmp_path / "out" / "train") == ["images-000000.tar", "images-000001.tar"]
    with pytest.raises(SystemExit):  # a second run needs --overwrite
        shards_cli.main(argv)
    assert "--overwrite" in capsys.readouterr().err
    assert shards_cli.main([*argv, "--overwrite", "--max-bytes", "1M"]) == 0


def test_parse_size():
    assert shards_cli.parse_size("512M") == 512 << 20
    assert shards_cli.parse_size("1G") == 1 << 30 and shards_cli.parse_size("4096") == 4096


def test_manifest_records_the_complete_series(tmp_path):
    from multimodal.data.shards import read_manifest

    with ShardWriter(tmp_path, "m", max_samples=3) as writer:
        for i in range(7):
            writer.write(_manifest_sample(i))
    manifest = read_manifest(writer.manifest_path())
    assert manifest["samples"] == 7
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert [s["name"] for s in manifest["shards"]] == [p.name for p in writer.summary.shards]
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "aborted", "m") as failing:
        failing.write(_manifest_sample(0))
        raise RuntimeError("crash")
    assert not (tmp_path / "aborted" / "m.manifest.json").exists()


def _manifest_sample(i: int) -> dict:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    return {"__key__": f"s{i}", "png": buffer.getvalue(), "txt": f"caption {i}"}
