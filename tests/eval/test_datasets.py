"""Evaluation data without shards (multimodal/eval/datasets.py): an ImageFolder tree, CSV and
JSONL files and shards of the same digit images give the same batches and the same zero-shot
and retrieval reports through the commands; broken images are skipped and counted; torchvision
datasets are read from disk only."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from multimodal.data.digits import DIGIT_NAMES, load_digit_images
from multimodal.data.shards import encode_png, write_shards
from multimodal.eval import commands, evaluate
from multimodal.eval.commands import retrieval_main, zeroshot_main
from multimodal.eval.datasets import DatasetSpec, open_samples, parse_spec
from multimodal.eval.evaluate import eval_loader
from multimodal.eval.loading import LoadedModel, instantiate_model_and_data
from multimodal.eval.report import Section
from tests.export.conftest import tiny_digits_config
from tests.helpers import save_task

PER_CLASS = 4
ALPHABETICAL = sorted(DIGIT_NAMES)  # ImageFolder numbers the class folders in sorted order


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(checkpoint, config, LoadedModel) of a randomly initialised 1-layer, 32-wide digits
    CLIP; the model is built once (rebuilding it from the config takes seconds), and the
    commands get it instead of loading the checkpoint (tests/eval/test_commands.py tests that)."""
    root = tmp_path_factory.mktemp("tiny_clip")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_digits_config()))
    task, data = instantiate_model_and_data(config)
    checkpoint = save_task(task, root / "tiny.ckpt")
    return checkpoint, config, LoadedModel.from_datamodule(task.model.eval(), data, "tiny CLIP")


@pytest.fixture
def tiny(tiny_run, monkeypatch):
    monkeypatch.setattr(commands, "load_model", lambda *args, **kwargs: tiny_run[2])
    return tiny_run[:2]


@pytest.fixture
def loaded(tiny_run):
    return tiny_run[2]


@pytest.fixture
def no_plots(monkeypatch):
    """Report sections without their plots (drawing them takes a second a report; they are
    tested in tests/eval/test_report.py): the metrics are what these tests compare."""
    for name in ("per_class_section", "confusion_section", "recall_curve_section"):
        monkeypatch.setattr(evaluate, name, lambda *args, title="", **kwargs: Section(title))


def captions(name: str) -> list[str]:
    return [f"a photo of the number {name}", f"a handwritten {DIGIT_NAMES.index(name)}"]


@pytest.fixture(scope="module")
def same_images(tmp_path_factory):
    """40 digit scans (4 a class) written as an ImageFolder tree, a CSV (one row per caption,
    with labels), a JSONL (caption lists, class names only) and shards, in the same order."""
    root = tmp_path_factory.mktemp("same_images")
    images, labels = load_digit_images(32)
    folder = root / "images"
    rows, samples = [], []
    for label, name in enumerate(ALPHABETICAL):
        (folder / name).mkdir(parents=True)
        chosen = np.flatnonzero(labels == DIGIT_NAMES.index(name))[:PER_CLASS]
        for i, index in enumerate(chosen):
            png = encode_png(Image.fromarray(images[index]))
            relative = f"{name}/{i:04d}.png"
            (folder / relative).write_bytes(png)
            rows.append({"image": relative, "label": label, "class_name": name})
            samples.append(
                {
                    "__key__": f"{name}-{i:04d}",
                    "png": png,
                    "txt": captions(name)[0],
                    "json": {"label": label, "class_name": name, "captions": captions(name)},
                }
            )
    with open(folder / "data.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label", "class_name", "caption"])
        writer.writeheader()
        for row in rows:
            for caption in captions(row["class_name"]):
                writer.writerow({**row, "caption": caption})
    (root / "data.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "image": f"images/{r['image']}",
                    "class_name": r["class_name"],
                    "caption": captions(r["class_name"]),
                }
            )
            + "\n"
            for r in rows
        )
    )
    write_shards(samples, root / "shards", prefix="digits", progress=False)
    return {
        "imagefolder": f"imagefolder:{folder}",
        "csv": f"csv:{folder / 'data.csv'}",
        "jsonl": f"jsonl:{root / 'data.jsonl'}",
        "shards": str(root / "shards"),
        "folder": folder,
    }


FORMATS = ("imagefolder", "csv", "jsonl", "shards")


def common(tiny, data: str, out) -> list[str]:
    checkpoint, config = tiny
    return [
        "--checkpoint", str(checkpoint), "--config", str(config), "--data", data,
        "--out", str(out), "--no-progress", "--batch-size", "16", "--num-workers", "0",
    ]  # fmt: skip


def read_metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_every_format_gives_the_batches_of_the_shards(loaded, same_images):

    def batches(data: str) -> dict:
        found = {"images": [], "labels": [], "references": [], "keys": []}
        for batch in eval_loader(data, loaded, batch_size=16, num_workers=0):
            for name in found:
                found[name] += list(batch[name])
        return found

    shards = batches(same_images["shards"])
    assert len(shards["keys"]) == 10 * PER_CLASS
    for name in ("imagefolder", "csv", "jsonl"):
        found = batches(same_images[name])
        torch.testing.assert_close(
            torch.stack(found["images"]), torch.stack(shards["images"]), rtol=0, atol=0
        )
        assert found["labels"] == shards["labels"], name
        if name != "imagefolder":  # an ImageFolder tree has no captions
            assert found["references"] == shards["references"], name
    keys = batches(same_images["imagefolder"])["keys"]
    assert keys[:2] == ["eight/0000.png", "eight/0001.png"]  # relative paths, folder order
    assert batches(same_images["csv"])["keys"] == keys  # paths as the CSV writes them
    # two workers read the same batches as one process
    loader = eval_loader(same_images["jsonl"], loaded, batch_size=16, num_workers=2)
    assert [k for batch in loader for k in batch["keys"]] == [f"images/{k}" for k in keys]


def test_zeroshot_metrics_are_identical_across_formats(tiny, same_images, tmp_path, request):
    reports = {}
    for name in FORMATS:
        out = tmp_path / name
        examples = "2" if name == "imagefolder" else "0"
        argv = [*common(tiny, same_images[name], out), "--examples", examples]
        assert zeroshot_main(argv) == 0, name
        if name == "imagefolder":  # one full report; the others without plots
            request.getfixturevalue("no_plots")
        reports[name] = read_metrics(out)["zeroshot"]
        # class names from the data (sorted folder names), templates of the matching built-in
        summary = (out / "summary.md").read_text()
        assert "**templates**: digits" in summary and "from the data (10 classes)" in summary
    first = reports["imagefolder"]
    assert first["n_samples"] == 10 * PER_CLASS and "skipped" not in first
    for name in FORMATS[1:]:
        assert reports[name] == first, name
    assert "Zero-shot: examples" in (tmp_path / "imagefolder/report.html").read_text()


def test_classes_are_checked_against_the_data(tiny, same_images, tmp_path, capsys, no_plots):
    # --classes digits numbers zero..nine; the tree numbers its folders alphabetically
    argv = [*common(tiny, same_images["imagefolder"], tmp_path / "x"), "--classes", "digits"]
    assert zeroshot_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "does not match the data imagefolder:" in err and "'zero'" in err and "'eight'" in err
    # the same names in the tree's order are accepted
    names = tmp_path / "names.txt"
    names.write_text("\n".join(ALPHABETICAL))
    argv = [*common(tiny, same_images["csv"], tmp_path / "ok"), "--examples", "0"]
    assert zeroshot_main([*argv, "--classes", str(names), "--templates", "digits"]) == 0
    assert read_metrics(tmp_path / "ok")["zeroshot"]["n_samples"] == 10 * PER_CLASS


def test_retrieval_metrics_are_identical_across_captioned_formats(
    tiny, same_images, tmp_path, no_plots
):
    reports = {}
    for name in ("csv", "jsonl", "shards"):
        out = tmp_path / name
        assert retrieval_main([*common(tiny, same_images[name], out), "--examples", "0"]) == 0
        reports[name] = read_metrics(out)["retrieval"]
    assert reports["csv"]["n_texts"] == 2 * 10 * PER_CLASS  # the CSV's rows of each image
    assert reports["csv"] == reports["jsonl"] == reports["shards"]


def test_retrieval_refuses_data_without_captions(tiny, same_images, tmp_path, capsys):
    assert retrieval_main(common(tiny, same_images["imagefolder"], tmp_path)) == 2
    assert "has no captions" in capsys.readouterr().err


def test_broken_images_are_skipped_counted_and_logged(tiny, loaded, same_images, tmp_path, caplog):
    folder = tmp_path / "tree"
    for file in sorted(same_images["folder"].rglob("*.png")):
        target = folder / file.relative_to(same_images["folder"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
    good = (folder / "six/0001.png").read_bytes()
    (folder / "six/0001.png").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "two/0000.png").write_bytes(b"not an image at all")
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING):
        argv = [*common(tiny, f"imagefolder:{folder}", out), "--examples", "4"]
        assert zeroshot_main(argv) == 0
    metrics = read_metrics(out)["zeroshot"]
    assert metrics["n_samples"] == 10 * PER_CLASS - 2
    assert metrics["skipped"] == {"undecodable image": 2}
    assert "six/0001.png" in caplog.text and "two/0000.png" in caplog.text

    table = tmp_path / "missing.csv"
    table.write_text("image,label\nnowhere.png,0\n" + f"{folder}/one/0000.png,1\n")
    loader = eval_loader(f"csv:{table}", loaded, num_workers=0)
    assert [k for batch in loader for k in batch["keys"]] == [f"{folder}/one/0000.png"]
    assert loader.skip_counter.take() == {"missing image file": 1}


def write_idx(path, array: np.ndarray) -> None:
    """An MNIST idx file (gzip-less, big-endian header) of a uint8 array."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_datasets_are_read_from_disk_only(tmp_path, capsys, tiny):
    raw = tmp_path / "MNIST/raw"  # torchvision's MNIST layout, written here (no download)
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {"train": (rng.integers(0, 256, (6, 28, 28)), np.arange(6) % 10)}
    splits["t10k"] = (rng.integers(0, 256, (4, 28, 28)), np.array([3, 1, 4, 1]))
    for prefix, (images, labels) in splits.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    test = open_samples(f"torchvision:MNIST:{tmp_path}")
    assert len(test) == 4 and test.class_names[3] == "3 - three"
    sample = test[2]
    assert sample["__key__"] == "test-000002" and sample["json"]["label"] == 4
    assert sample["image"].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(sample["image"])[..., 0], splits["t10k"][0][2])
    assert len(open_samples(f"torchvision:MNIST:{tmp_path}:train")) == 6

    missing = tmp_path / "nothing_here"
    argv = [*common(tiny, f"torchvision:CIFAR10:{missing}", tmp_path / "x"), "--classes", "cifar10"]
    assert zeroshot_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{missing}/cifar-10-batches-py" in err and "never downloaded" in err
    assert not missing.exists()  # nothing was downloaded there


def test_specs_parse_validate_and_name_the_bad_field(tmp_path):
    assert parse_spec("dir/train-{000000..000009}.tar") == DatasetSpec(
        "shards", "dir/train-{000000..000009}.tar"
    )
    assert parse_spec("pipe:aws s3 cp s3://b/x.tar -").kind == "shards"
    assert parse_spec("imagefolder:/data/x") == DatasetSpec("imagefolder", "/data/x")
    spec = parse_spec("torchvision:CIFAR100:/data/c:train")
    assert spec == DatasetSpec("torchvision", "/data/c", dataset="CIFAR100", split="train")
    assert parse_spec(str(spec)) == spec
    assert parse_spec({"kind": "csv", "path": "a.csv"}) == DatasetSpec("csv", "a.csv")
    with pytest.raises(ValueError, match="DatasetSpec.kind='tar'"):
        DatasetSpec.from_dict({"kind": "tar", "path": "x"})
    with pytest.raises(ValueError, match=r"unknown fields \['root'\]"):
        parse_spec({"kind": "csv", "path": "a.csv", "root": "x"})
    with pytest.raises(ValueError, match="DatasetSpec.dataset"):
        parse_spec("torchvision:10:/data")
    with pytest.raises(ValueError, match="torchvision:NAME:ROOT"):
        parse_spec("torchvision:CIFAR10")
    with pytest.raises(ValueError, match="DatasetSpec.dataset='CIFAR10' is only for"):
        DatasetSpec("csv", "a.csv", dataset="CIFAR10")
    with pytest.raises(ValueError, match="DatasetSpec.path"):
        parse_spec("imagefolder:")

    table = tmp_path / "bad.csv"
    table.write_text("path,label\na.png,1\n")
    with pytest.raises(ValueError, match="bad.csv.*no 'image' column"):
        open_samples(f"csv:{table}")
    table.write_text("image,label\na.png,1\nb.png,x\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: label 'x' is not an int"):
        open_samples(f"csv:{table}")
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"image": "a.png", "label": 0}\n{"image": "a.png", "label": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: image 'a.png' has label 1"):
        open_samples(f"jsonl:{lines}")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        open_samples(f"imagefolder:{tmp_path / 'none'}")
