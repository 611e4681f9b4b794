"""Evaluation data without shards: one dataset spec for shards, an ImageFolder tree, a
torchvision dataset already on disk, and CSV / JSONL files of image paths.

A `DatasetSpec` is parsed from a string (the `--data` of `multimodal zeroshot` and
`multimodal retrieval`) or from a dict (a YAML suite):

    shards:PATH | PATH            webdataset shards, as `multimodal.data.pipeline.expand_urls`
    imagefolder:DIR               one folder per class (torchvision ImageFolder order: sorted
                                  folder names, then sorted files); class names are the folder
                                  names with `_` written as a space
    torchvision:NAME:ROOT[:SPLIT] a torchvision dataset class (CIFAR10, MNIST, ...) already
                                  under ROOT, never downloaded; SPLIT test (default) or train
    csv:FILE | jsonl:FILE         one row / line per image: `image` (a path relative to the
                                  file), and `caption` and/or `label` (an int) or `class_name`

    {"kind": "imagefolder", "path": "DIR"}   the same as a dict (fields of `DatasetSpec`)

Every source but shards is a map-style dataset of *decoded samples* shaped as the shard reader
yields them (`multimodal.data.pipeline.decode_sample`): `__key__`, `image` (RGB PIL), `txt`
(the first caption) and `json` (`captions`, `label`, `class_name`), so the datamodules' sample
map and collate turn them into the same batches and the evaluations run unchanged. Keys are
stable: relative image paths (ImageFolder, CSV, JSONL) or row numbers (torchvision). Rows of a
CSV / JSONL that name the same image are one sample with every caption. An image that is
missing or does not decode is skipped, counted by reason in the loader's `skip_counter` and
logged with its key, as the shard pipeline skips broken samples.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, Dataset

from multimodal.data.pipeline import SkipCounter, SkipSample
from multimodal.data.shards_datamodules import ImageTextSample, sample_label

log = logging.getLogger(__name__)

KINDS = ("shards", "imagefolder", "torchvision", "csv", "jsonl")
SPLITS = ("test", "train", "val")
MAX_SKIP_WARNINGS = 20  # per process; the rest go to debug (the totals are reported)
EXPECTED_SPEC = (
    "shards:PATH (or a bare shard path), imagefolder:DIR, torchvision:NAME:ROOT[:SPLIT], "
    "csv:FILE or jsonl:FILE"
)


@dataclass(frozen=True)
class DatasetSpec:
    """Where evaluation images come from; validated on creation.

    Args:
        kind: one of `KINDS`.
        path: the shards (any form `expand_urls` takes), the ImageFolder root, the torchvision
            root or the CSV / JSONL file.
        dataset: the torchvision dataset class name (only for kind "torchvision").
        split: the torchvision split, "test" or "train" ("val" where the class has one).
    """

    kind: str
    path: str
    dataset: str | None = None
    split: str = "test"

    def __post_init__(self) -> None:
        prefix = "DatasetSpec."
        if self.kind not in KINDS:
            raise ValueError(f"{prefix}kind={self.kind!r} must be one of {list(KINDS)}")
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"{prefix}path={self.path!r} must be a non-empty path")
        if self.kind == "torchvision":
            if not isinstance(self.dataset, str) or not self.dataset.isidentifier():
                raise ValueError(
                    f"{prefix}dataset={self.dataset!r} must name a torchvision dataset class "
                    "(e.g. CIFAR10)"
                )
        elif self.dataset is not None:
            raise ValueError(
                f"{prefix}dataset={self.dataset!r} is only for kind 'torchvision', not "
                f"{self.kind!r}"
            )
        if self.split not in SPLITS:
            raise ValueError(f"{prefix}split={self.split!r} must be one of {list(SPLITS)}")

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        """A spec from its string form (see the module docstring); a string without a known
        `kind:` prefix is a shard path, as before specs existed."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"data spec {text!r} is empty; expected {EXPECTED_SPEC}")
        kind, sep, rest = text.partition(":")
        if not sep or kind not in KINDS:
            return cls("shards", text)
        if kind != "torchvision":
            return cls(kind, rest)
        name, sep, root = rest.partition(":")
        if not sep or not root:
            raise ValueError(
                f"data spec {text!r}: expected torchvision:NAME:ROOT[:SPLIT], e.g. "
                "torchvision:CIFAR10:~/data"
            )
        split = "test"
        head, _, tail = root.rpartition(":")
        if head and tail in SPLITS:
            root, split = head, tail
        return cls(kind, root, dataset=name, split=split)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> DatasetSpec:
        """A spec from a dict of its fields (a YAML suite entry)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"data spec {dict(value)!r}: unknown fields {unknown}; known {known}")
        missing = sorted({"kind", "path"} - set(value))
        if missing:
            raise ValueError(f"data spec {dict(value)!r}: missing fields {missing}")
        return cls(**{k: str(v) if k == "path" else v for k, v in value.items()})

    def __str__(self) -> str:
        if self.kind == "torchvision":
            split = "" if self.split == "test" else f":{self.split}"
            return f"torchvision:{self.dataset}:{self.path}{split}"
        return f"{self.kind}:{self.path}"


def parse_spec(value: str | os.PathLike | Mapping[str, Any] | DatasetSpec) -> DatasetSpec:
    """A `DatasetSpec` from a spec, its string form, a path (shards) or a dict."""
    if isinstance(value, DatasetSpec):
        return value
    if isinstance(value, Mapping):
        return DatasetSpec.from_dict(value)
    if isinstance(value, os.PathLike):
        return DatasetSpec("shards", os.fspath(value))
    return DatasetSpec.parse(value)


def display_name(name: str) -> str:
    """A folder or dataset class name as a class name: `_` written as a space."""
    return name.replace("_", " ")


# ---------------------------------------------------------------------------------------------
# sources: records of images (files or torchvision rows) -> decoded samples


@dataclass(frozen=True)
class Record:
    """One image of a file-based source: its key, file and what is known of it."""

    key: str
    file: str
    captions: tuple[str, ...] = ()
    label: int = -1
    class_name: str | None = None


class ImageSamples(Dataset, ABC):
    """Decoded samples (see the module docstring) of a source; an image that cannot be read
    gives a `SkipSample` (returned, not raised, so DataLoader workers carry it to the
    collate that counts it).

    Attributes:
        spec: what was opened.
        class_map: label -> class name for the labels the source names.
    """

    def __init__(self, spec: DatasetSpec, class_map: Mapping[int, str]) -> None:
        self.spec = spec
        self.class_map = dict(class_map)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Every class name in label order, or None when some label in 0..max is unnamed."""
        if not self.class_map or sorted(self.class_map) != list(range(len(self.class_map))):
            return None
        return tuple(self.class_map[i] for i in range(len(self.class_map)))

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any] | SkipSample: ...


def _sample(
    key: str, url: str, image: Image.Image, captions: Sequence[str], label: int, name: str | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"captions": list(captions)}
    if label >= 0:
        meta["label"] = label
    if name is not None:
        meta["class_name"] = name
    sample = {"__key__": key, "__url__": url, "image": image, "json": meta}
    if captions:
        sample["txt"] = captions[0]
    return sample


def read_image(file: str) -> Image.Image:
    """An RGB PIL image of `file`, its pixels loaded; SkipSample when missing or broken."""
    try:
        with Image.open(file) as image:
            return image.convert("RGB")  # loads the pixels now, so corruption shows here
    except FileNotFoundError as error:
        raise SkipSample("missing image file", str(error)) from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib errors ...
        message = re.sub(r" <[^>]*>", "", str(error))
        raise SkipSample("undecodable image", f"{type(error).__name__}: {message}") from error


class FileSamples(ImageSamples):
    """Samples of image files listed by an ImageFolder tree or a CSV / JSONL file."""

    def __init__(
        self, spec: DatasetSpec, records: Sequence[Record], class_map: Mapping[int, str]
    ) -> None:
        super().__init__(spec, class_map)
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkipSample:
        record = self.records[index]
        try:
            image = read_image(record.file)
        except SkipSample as skip:
            skip.detail = f"{record.key}: {skip.detail}"
            return skip
        return _sample(
            record.key, str(self.spec), image, record.captions, record.label, record.class_name
        )


def image_folder(spec: DatasetSpec) -> FileSamples:
    """An ImageFolder tree: labels and file order as torchvision's ImageFolder."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(spec.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder {spec.path!r}: no such directory")
    try:
        folders, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise ValueError(
            f"imagefolder {spec.path!r} holds no class folder; expected DIR/<class>/<image>"
        ) from None
    items = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not items:
        raise ValueError(
            f"imagefolder {spec.path!r}: no image files ({', '.join(IMG_EXTENSIONS)}) in its "
            f"class folders {folders[:5]}"
        )
    names = {i: display_name(folder) for folder, i in class_to_idx.items()}
    records = [
        Record(Path(file).relative_to(root).as_posix(), file, (), label, names[label])
        for file, label in items
    ]
    return FileSamples(spec, records, names)


def _int_label(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{where}: label {value!r} is not an int")
    try:
        label = int(value)
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not an int") from None
    if label < 0:
        raise ValueError(f"{where}: label {label} must be >= 0")
    return label


def _rows(spec: DatasetSpec, file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) of a CSV (header row) or JSONL (one object a line) file."""
    if spec.kind == "csv":
        with open(file, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "image" not in reader.fieldnames:
                raise ValueError(
                    f"{file}: the header {reader.fieldnames} has no 'image' column; expected "
                    "image and caption and/or label or class_name"
                )
            for row in reader:
                yield f"{file}:{reader.line_num}", {k: v for k, v in row.items() if v}
        return
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _captions(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: caption {value!r} must be a string or a list of strings")
    return [v.strip() for v in values if v.strip()]


def table(spec: DatasetSpec) -> FileSamples:
    """A CSV or JSONL file of image paths (relative to the file) with captions and/or labels.
    Without `label`, labels number the sorted class names (as ImageFolder numbers folders)."""
    file = Path(spec.path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{spec.kind} {spec.path!r}: no such file")
    grouped: dict[str, dict[str, Any]] = {}
    for where, row in _rows(spec, file):
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: no image path (the 'image' field)")
        if not {"caption", "label", "class_name"} & set(row):
            raise ValueError(f"{where}: expected a caption and/or a label or class_name")
        label = _int_label(row["label"], where) if "label" in row else -1
        name = row.get("class_name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"{where}: class_name {name!r} must be a non-empty string")
        entry = grouped.setdefault(
            image.strip(), {"where": where, "captions": [], "label": label, "name": name}
        )
        if (entry["label"], entry["name"]) != (label, name):
            raise ValueError(
                f"{where}: image {image!r} has label {label} / class_name {name!r}, but "
                f"{entry['label']} / {entry['name']!r} at {entry['where']}"
            )
        entry["captions"] += _captions(row.get("caption"), where)
    if not grouped:
        raise ValueError(f"{spec.kind} {spec.path!r}: no rows")
    named = sorted({e["name"] for e in grouped.values() if e["name"] is not None})
    by_name = {name: i for i, name in enumerate(named)}
    class_map: dict[int, str] = {}
    records = []
    for image, entry in grouped.items():
        label, name = entry["label"], entry["name"]
        if label < 0 and name is not None:
            label = by_name[name]
        if name is not None:
            known = class_map.setdefault(label, name)
            if known != name:
                raise ValueError(
                    f"{entry['where']}: label {label} is {name!r} here but {known!r} elsewhere"
                )
        path = Path(image).expanduser()
        records.append(
            Record(
                key=Path(image).as_posix(),
                file=str(path if path.is_absolute() else file.parent / path),
                captions=tuple(dict.fromkeys(entry["captions"])),
                label=label,
                class_name=name,
            )
        )
    return FileSamples(spec, records, class_map)


class TorchvisionSamples(ImageSamples):
    """Samples of a torchvision dataset object (`dataset[i]` = (PIL image, int target))."""

    def __init__(self, spec: DatasetSpec, data: Any, class_map: Mapping[int, str]) -> None:
        super().__init__(spec, class_map)
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any] | SkipSample:
        key = f"{self.spec.split}-{index:06d}"
        try:
            image, target = self.data[index]
            image = image.convert("RGB")
        except Exception as error:  # a broken file of a file-backed torchvision dataset
            return SkipSample("unreadable sample", f"{key}: {type(error).__name__}: {error}")
        label = int(target)
        return _sample(key, str(self.spec), image, (), label, self.class_map.get(label))


def _looked_in(cls: type, root: Path) -> Path:
    """Where a torchvision dataset class reads its files under `root` (for the error)."""
    base = getattr(cls, "base_folder", None)  # CIFAR10/100, SVHN ...
    if isinstance(base, str):
        return root / base
    if isinstance(getattr(cls, "raw_folder", None), property):  # MNIST and its kin
        return root / cls.__name__ / "raw"
    return root


def torchvision_dataset(spec: DatasetSpec) -> TorchvisionSamples:
    """A torchvision dataset already on disk, opened with `download=False`."""
    import torchvision.datasets

    assert spec.dataset is not None  # validated by DatasetSpec
    cls = getattr(torchvision.datasets, spec.dataset, None)
    if not (inspect.isclass(cls) and issubclass(cls, torchvision.datasets.VisionDataset)):
        raise ValueError(f"torchvision.datasets has no dataset class {spec.dataset!r}")
    parameters = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "train" in parameters:
        if spec.split == "val":
            raise ValueError(f"torchvision {spec.dataset} has only the splits train and test")
        kwargs["train"] = spec.split == "train"
    elif "split" in parameters:
        kwargs["split"] = spec.split
    if "download" in parameters:
        kwargs["download"] = False
    root = Path(spec.path).expanduser()
    try:
        data = cls(str(root), **kwargs)
    except (RuntimeError, OSError) as error:
        # torchvision's own RuntimeError suggests download=True, which this reader never does
        detail = "" if type(error) is RuntimeError else f" ({str(error).splitlines()[0]})"
        raise FileNotFoundError(
            f"torchvision {spec.dataset} ({spec.split}) not found: looked in "
            f"{_looked_in(cls, root)}{detail}; it is never downloaded here: put the dataset "
            "under that root first"
        ) from None
    classes = getattr(data, "classes", None) or []
    class_map = {i: display_name(str(name)) for i, name in enumerate(classes)}
    return TorchvisionSamples(spec, data, class_map)


OPENERS: dict[str, Callable[[DatasetSpec], ImageSamples]] = {
    "imagefolder": image_folder,
    "torchvision": torchvision_dataset,
    "csv": table,
    "jsonl": table,
}


def open_samples(spec: str | Mapping[str, Any] | DatasetSpec) -> ImageSamples:
    """The decoded samples of a spec that is not shards (shards are read by the pipeline)."""
    spec = parse_spec(spec)
    if spec.kind == "shards":
        raise ValueError(f"{spec}: shards are read by multimodal.data.pipeline, not opened here")
    return OPENERS[spec.kind](spec)


# ---------------------------------------------------------------------------------------------
# loading: decoded samples -> the shard datamodules' batches, skips counted


@dataclass
class CaptionOptional:
    """`ImageTextSample` for sources that may hold no caption (a class-per-folder tree): a
    sample without one is kept, with no references and the ids of an empty text."""

    sample: ImageTextSample

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if sample.get("txt") or sample["json"].get("captions"):
            return self.sample(sample)
        return {
            "image": self.sample.transform(sample["image"]),  # (3, H, W)
            "input_ids": self.sample.tokenizer.encode("", max_length=self.sample.context_length),
            "label": sample_label(sample),
            "key": sample["__key__"],
            "references": [],
        }


_warnings = Counter[str]()  # skip warnings logged by this process


def _log_skip(skip: SkipSample) -> None:
    _warnings["skips"] += 1
    level = logging.WARNING if _warnings["skips"] <= MAX_SKIP_WARNINGS else logging.DEBUG
    log.log(level, "skipped sample: %s (%s)", skip.reason, skip.detail)


@dataclass
class SkippingCollate:
    """Samples (or `SkipSample`s) -> a batch of `collate(map_sample(...))` with a `"skipped"`
    entry counting the left-out samples by reason; a batch of skips only: just that entry."""

    map_sample: Callable[[dict[str, Any]], dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, samples: list[dict[str, Any] | SkipSample]) -> dict[str, Any]:
        items, skipped = [], Counter[str]()
        for sample in samples:
            if not isinstance(sample, SkipSample):
                try:
                    items.append(self.map_sample(sample))
                    continue
                except SkipSample as skip:
                    skip.detail = f"{sample['__key__']}: {skip.detail}"
                    sample = skip
            skipped[sample.reason] += 1
            _log_skip(sample)
        batch = self.collate(items) if items else {}
        batch["skipped"] = dict(skipped)
        return batch


class SampleLoader(DataLoader):
    """A DataLoader over `ImageSamples` in order (every sample once, partial last batch kept)
    yielding the shard loaders' dict batches; skip counts are summed in `skip_counter`, as
    `ShardLoader` does, and a batch whose samples were all skipped is not yielded."""

    def __init__(
        self,
        samples: ImageSamples,
        collate: SkippingCollate,
        *,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        super().__init__(
            samples,
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            collate_fn=collate,
        )
        self.skip_counter = SkipCounter()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            self.skip_counter.add(batch["skipped"])
            if "images" in batch:
                yield batch
