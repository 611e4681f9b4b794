"""Webdataset shard writing: image-text samples into size-limited tar shards, atomically.

A sample is a dict in webdataset's layout: `__key__` (a unique string) and one entry per file
extension. The reader (`multimodal.data.pipeline`) relies on exactly this format:

- `jpg` or `png`: the encoded image, written as it is when the input is already such a file;
- `txt`: the caption (UTF-8);
- `json`: a UTF-8 JSON object with any of `label` (int), `class_name` (str), `captions`
  (list[str], all captions of the image, the `txt` one included), `vqa` (list of
  {"question": str, "answers": list[str]}), `zeroshot_captions` (list[str]), `split` (str),
  and free extra fields;
- `cls`: the integer label as ASCII text, added from `json["label"]` when not given.

Nothing is pickled: only the extensions above are accepted. Each shard is written under a
hidden temporary name and renamed to `prefix-000000.tar`, `prefix-000001.tar`, ... only once
it is complete and on disk, so a reader never sees half a shard.

The sources (`samples_from_image_folder`, `samples_from_classification`, and
`multimodal.data.demo`) yield samples and `Skipped` records: one bad input is counted with its
reason in the `WriteSummary`, never an exception.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter

from multimodal.data.digits import split_indices

Sample = dict[str, Any]

IMAGE_EXTENSIONS = ("jpg", "png")
TEXT_EXTENSIONS = ("txt", "json", "cls")
SAMPLE_EXTENSIONS = IMAGE_EXTENSIONS + TEXT_EXTENSIONS
# image files an image folder may hold; formats other than JPEG and PNG are re-encoded as PNG
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASSIFICATION_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
)

_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "jpg": (b"\xff\xd8\xff",)}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")  # keys, prefixes, split names: no dots
_MAX_KEY = 95  # a USTAR member name holds 100 characters: key + ".json"
_MTIME = 0  # fixed member times: the same samples give byte-identical shards
_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


class Skipped(NamedTuple):
    """An input a source could not turn into a sample, and why; `split` where it is known."""

    source: str
    reason: str
    split: str | None = None


MANIFEST_SUFFIX = ".manifest.json"  # next to the shards: prefix.manifest.json


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A series' manifest: {"prefix", "samples", "shards": [{"name", "samples"}]}."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class WriteSummary:
    """What one shard series holds: samples, shard paths, bytes on disk and skipped inputs."""

    samples: int = 0
    shards: list[Path] = field(default_factory=list)
    shard_samples: list[int] = field(default_factory=list)  # samples in each shard
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    name: str = ""
    seconds: float = 0.0

    @property
    def pattern(self) -> str:
        """The shards as one webdataset URL, brace-expanded: `dir/prefix-{000000..000004}.tar`."""
        if len(self.shards) <= 1:
            return str(self.shards[0]) if self.shards else ""
        head, first = self.shards[0].stem.rsplit("-", 1)
        last = self.shards[-1].stem.rsplit("-", 1)[1]
        return str(self.shards[0].with_name(f"{head}-{{{first}..{last}}}.tar"))

    def __str__(self) -> str:
        name = f"{self.name}: " if self.name else ""
        lines = [
            f"{name}{_count(self.samples, 'sample')} in {_count(len(self.shards), 'shard')}, "
            f"{_human_bytes(self.bytes)}, {self.seconds:.1f} s"
            + (f" -> {self.pattern}" if self.shards else "")
        ]
        if self.skipped:
            lines.append(f"  skipped {_count(len(self.skipped), 'input')}:")
            lines += [f"    {source}: {reason}" for source, reason in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"    ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


def format_summaries(summaries: Mapping[str, WriteSummary]) -> str:
    """One block per series and a total line, as the CLI prints them."""
    parts = [str(s) for s in summaries.values()]
    samples = _count(sum(s.samples for s in summaries.values()), "sample")
    shards = _count(sum(len(s.shards) for s in summaries.values()), "shard")
    skipped = _count(sum(len(s.skipped) for s in summaries.values()), "input")
    size = _human_bytes(sum(s.bytes for s in summaries.values()))
    parts.append(f"total: {samples} in {shards}, {size}, {skipped} skipped")
    return "\n".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{what}={value!r} must be a non-empty string of letters, digits, '_' and '-' "
            "(no dots or slashes: webdataset splits file names at the first dot)"
        )
    return value


# ---------------------------------------------------------------------------------------------
# encoding and validation of one sample


def _check_json_fields(meta: Mapping[str, Any], key: str) -> None:
    def fail(name: str, expected: str) -> None:
        raise ValueError(f"sample {key!r}: json[{name!r}]={meta[name]!r} must be {expected}")

    def is_strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    if "label" in meta and (isinstance(meta["label"], bool) or not isinstance(meta["label"], int)):
        fail("label", "an int")
    for name in ("class_name", "split"):
        if name in meta and not isinstance(meta[name], str):
            fail(name, "a string")
    for name in ("captions", "zeroshot_captions"):
        if name in meta and not is_strings(meta[name]):
            fail(name, "a list of strings")
    if "vqa" in meta:
        pairs = meta["vqa"]
        if not isinstance(pairs, list) or not all(
            isinstance(p, dict)
            and isinstance(p.get("question"), str)
            and is_strings(p.get("answers"))
            for p in pairs
        ):
            fail("vqa", 'a list of {"question": str, "answers": list[str]}')


def _to_bytes(value: Any, ext: str, key: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ValueError(f"sample {key!r}: {ext} must be bytes or str, got {type(value).__name__}")


def encode_sample(sample: Mapping[str, Any]) -> tuple[str, dict[str, bytes]]:
    """Check a sample against the shard format and encode it: (key, {extension: bytes}).

    `txt` may be str, `json` a dict, `cls` an int; images must already be encoded bytes whose
    format matches the extension. Raises ValueError naming the sample and the problem.
    """
    if not isinstance(sample, Mapping):
        raise ValueError(f"a sample must be a dict, got {type(sample).__name__}")
    key = sample.get("__key__")
    if not isinstance(key, str) or not _NAME.fullmatch(key) or len(key) > _MAX_KEY:
        raise ValueError(
            f"sample __key__={key!r} must be a string of at most {_MAX_KEY} letters, digits, "
            "'_' and '-' (no dots or slashes)"
        )
    # webdataset readers add __url__ and the like: metadata, never written
    entries = {ext: value for ext, value in sample.items() if not ext.startswith("__")}
    unknown = sorted(set(entries) - set(SAMPLE_EXTENSIONS))
    if unknown:
        raise ValueError(
            f"sample {key!r}: extensions {unknown} are not among {list(SAMPLE_EXTENSIONS)} "
            "(only images, text and JSON are written; never pickles)"
        )
    images = [ext for ext in IMAGE_EXTENSIONS if ext in entries]
    if len(images) != 1:
        raise ValueError(f"sample {key!r} must hold exactly one image (jpg or png), has {images}")
    ext = images[0]
    out: dict[str, bytes] = {}
    data = entries[ext]
    if not isinstance(data, (bytes, bytearray, memoryview)) or not data.startswith(_MAGIC[ext]):
        raise ValueError(f"sample {key!r}: {ext} must be the bytes of an encoded {ext} file")
    out[ext] = bytes(data)

    text = _to_bytes(entries.get("txt", b""), "txt", key)
    try:
        caption = text.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"sample {key!r}: txt is not UTF-8 ({error})") from None
    if not caption.strip():
        raise ValueError(f"sample {key!r}: txt (the caption) is missing or empty")
    out["txt"] = text

    meta: dict[str, Any] = {}
    if "json" in entries:
        raw = entries["json"]
        if isinstance(raw, Mapping):
            meta = dict(raw)
        else:
            try:
                meta = json.loads(_to_bytes(raw, "json", key))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"sample {key!r}: json is not UTF-8 JSON ({error})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"sample {key!r}: json must be a JSON object")
        _check_json_fields(meta, key)
        if "captions" in meta and caption not in meta["captions"]:
            raise ValueError(f"sample {key!r}: json['captions'] must include txt={caption!r}")
        if isinstance(raw, Mapping):
            try:
                text_json = json.dumps(
                    meta, ensure_ascii=False, sort_keys=True, separators=(",", ":")
                )
            except (TypeError, ValueError) as error:  # e.g. numpy scalars, sets
                raise ValueError(f"sample {key!r}: json not JSON-serialisable ({error})") from None
            out["json"] = text_json.encode("utf-8")
        else:
            out["json"] = _to_bytes(raw, "json", key)

    label = meta.get("label")
    if "cls" in entries:
        raw_cls = entries["cls"]
        if isinstance(raw_cls, int) and not isinstance(raw_cls, bool):
            value = raw_cls
        else:
            try:
                value = int(_to_bytes(raw_cls, "cls", key).decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise ValueError(f"sample {key!r}: cls={raw_cls!r} must be an int") from None
        if label is not None and value != label:
            raise ValueError(f"sample {key!r}: cls={value} differs from json['label']={label}")
        label = value
    if label is not None:
        out["cls"] = str(label).encode("ascii")
    return key, out


def _member_bytes(size: int) -> int:
    """Bytes one tar member takes: a header block and the data padded to whole blocks."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _tar_bytes(members: int) -> int:
    """Size of a finished tar whose members take `members` bytes: two zero blocks end the
    archive and tarfile pads it to whole records."""
    return -(-(members + 2 * _BLOCK) // _RECORD) * _RECORD


def _check_limits(max_samples: int, max_bytes: int) -> None:
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples={max_samples!r} must be an int >= 1")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < _RECORD:
        raise ValueError(f"max_bytes={max_bytes!r} must be an int >= {_RECORD} (smallest tar)")


# ---------------------------------------------------------------------------------------------
# the writer


class ShardWriter:
    """Writes samples into `out_dir/prefix-000000.tar`, `prefix-000001.tar`, ... atomically.

    A new shard starts when the next sample would take the current one past `max_samples`
    samples or `max_bytes` bytes (a sample larger than `max_bytes` gets a shard of its own).
    Each shard is written to `.prefix-NNNNNN.tar.tmp` in the same folder, fsynced and renamed
    to its final name only when complete. An exception inside the `with` block removes the
    temporary file and the shards this writer finished, so a failed write never leaves a
    series that looks complete.

    Args:
        out_dir: folder of the shards, created if missing.
        prefix: shard file names start with it (letters, digits, `_`, `-`).
        max_samples: most samples per shard.
        max_bytes: most bytes per shard file (at least 10240, the smallest tar file).
        overwrite: replace shards `prefix-*.tar` already in `out_dir` (the ones beyond the new
            series are removed when it completes); without it such shards are an error.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str,
        *,
        max_samples: int = 10000,
        max_bytes: int = 1 << 30,
        overwrite: bool = False,
    ) -> None:
        self.prefix = _check_name(prefix, "prefix")
        _check_limits(max_samples, max_bytes)
        self.out_dir = Path(out_dir)
        self.max_samples, self.max_bytes, self.overwrite = max_samples, max_bytes, overwrite
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._existing = self._series_on_disk()
        if self._existing and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds {len(self._existing)} shards {prefix}-*.tar; "
                "pass overwrite=True (--overwrite) or write to another folder"
            )
        self.summary = WriteSummary(name=prefix)
        self._keys: set[str] = set()
        self._file: io.BufferedWriter | None = None
        self._tar: TarWriter | None = None
        self._tmp: Path | None = None
        self._count = 0  # samples in the open shard
        self._members = 0  # bytes its members take
        self._closed = False
        self._start = time.perf_counter()

    def _series_on_disk(self) -> list[Path]:
        pattern = re.compile(rf"{re.escape(self.prefix)}-\d{{6,}}\.tar")
        return sorted(p for p in self.out_dir.iterdir() if pattern.fullmatch(p.name))

    def shard_path(self, index: int) -> Path:
        """Final path of shard `index`."""
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: Mapping[str, Any]) -> int:
        """Validate, encode and append one sample; returns the bytes it takes in the tar."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed: write() after close() or abort()")
        key, encoded = encode_sample(sample)
        if key in self._keys:
            raise ValueError(f"sample __key__={key!r} was already written: keys must be unique")
        size = sum(_member_bytes(len(v)) for v in encoded.values())
        if self._tar is not None and (
            self._count >= self.max_samples or _tar_bytes(self._members + size) > self.max_bytes
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        self._tar.write({"__key__": key, **encoded})
        self._keys.add(key)
        self._count += 1
        self._members += size
        self.summary.samples += 1
        return size

    def skip(self, source: str, reason: str) -> None:
        """Count an input that could not be written, with the reason (shown in the summary)."""
        self.summary.skipped.append((source, reason))

    def _open_shard(self) -> None:
        final = self.shard_path(len(self.summary.shards))
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in _finish_shard / abort)
        self._tar = TarWriter(self._file, encoder=False, mtime=_MTIME)
        self._count = self._members = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._tmp is not None
        final = self.shard_path(len(self.summary.shards))
        try:
            self._tar.close()  # the end-of-archive blocks; the file itself stays open
            self._file.flush()
            os.fsync(self._file.fileno())
            size = self._file.tell()
            self._file.close()
            os.replace(self._tmp, final)
        except BaseException:
            self._discard_open_shard()
            raise
        self._tar = self._file = self._tmp = None
        _fsync_dir(self.out_dir)
        self.summary.shards.append(final)
        self.summary.shard_samples.append(self._count)
        self.summary.bytes += size

    def _discard_open_shard(self) -> None:
        if self._tar is not None:  # close the tar stream first, or its finaliser writes later
            with suppress(Exception):
                self._tar.close()
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None

    def close(self) -> WriteSummary:
        """Finish the last shard, remove stale shards beyond the series (overwrite), summarise."""
        if self._closed:
            return self.summary
        try:
            if self._tar is not None:
                self._finish_shard()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        for stale in set(self._existing) - set(self.summary.shards):
            stale.unlink(missing_ok=True)
        self.summary.seconds = time.perf_counter() - self._start
        self._write_manifest()
        return self.summary

    def manifest_path(self) -> Path:
        return self.out_dir / f"{self.prefix}{MANIFEST_SUFFIX}"

    def _write_manifest(self) -> None:
        """Record the finished series (shards and sample counts) last and atomically: readers
        size their epochs from it, and its presence marks the series as complete."""
        manifest = {
            "prefix": self.prefix,
            "samples": self.summary.samples,
            "shards": [
                {"name": path.name, "samples": n}
                for path, n in zip(self.summary.shards, self.summary.shard_samples, strict=True)
            ],
        }
        final = self.manifest_path()
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.out_dir)

    def abort(self) -> None:
        """Drop the shard being written and the shards already finished by this writer."""
        self._discard_open_shard()
        for shard in self.summary.shards:
            shard.unlink(missing_ok=True)
        self.manifest_path().unlink(missing_ok=True)
        self.summary.shards, self.summary.shard_samples, self.summary.bytes = [], [], 0
        self._closed = True


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the folder (POSIX; other systems lack directory fds)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _split_of_sample(sample: Mapping[str, Any]) -> str | None:
    meta = sample.get("json")
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        try:
            meta = json.loads(meta)
        except (TypeError, ValueError):
            return None  # encode_sample reports the bad json when the sample is written
    return meta.get("split") if isinstance(meta, Mapping) else None


def write_shards(
    samples: Iterable[Sample | Skipped],
    out_dir: str | os.PathLike,
    *,
    prefix: str,
    split_of: Callable[[Mapping[str, Any]], str | None] | None = None,
    max_samples: int = 10000,
    max_bytes: int = 1 << 30,
    overwrite: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, WriteSummary]:
    """Write samples as one shard series per split: `out_dir/train/prefix-000000.tar`, ...

    Args:
        samples: samples and `Skipped` records, as the `samples_from_*` sources yield them.
        out_dir: root folder; a split's shards go to `out_dir/<split>/`, samples without a
            split to `out_dir/` itself (summary key "all").
        prefix: shard file names start with it.
        split_of: the split of a sample (default: its `json["split"]`, None for no split).
        max_samples, max_bytes, overwrite: per shard series, see `ShardWriter`.
        progress: show a tqdm progress bar (on stderr).
        total: number of inputs, for the progress bar (default: `len(samples)` when sized).

    Returns:
        the summary of each series, by split name; skipped inputs of no split are listed
        with the unsplit series or else the first. On an exception every series is removed.
    """
    _check_name(prefix, "prefix")
    _check_limits(max_samples, max_bytes)  # before any input is read
    route = split_of or _split_of_sample
    root = Path(out_dir)
    writers: dict[str, ShardWriter] = {}
    keys: set[str] = set()
    if total is None and isinstance(samples, Sequence):
        total = len(samples)

    with ExitStack() as stack:

        def writer(split: str | None) -> ShardWriter:
            name = "all" if split is None else _check_name(split, "split")
            if name not in writers:
                folder = root if split is None else root / split
                writers[name] = stack.enter_context(
                    ShardWriter(
                        folder,
                        prefix,
                        max_samples=max_samples,
                        max_bytes=max_bytes,
                        overwrite=overwrite,
                    )
                )
                writers[name].summary.name = name
                writers[name]._keys = keys  # keys are unique across the splits too
            return writers[name]

        bar = stack.enter_context(
            tqdm(samples, total=total, disable=not progress, desc=prefix, unit="sample")
        )
        unplaced: list[Skipped] = []  # skipped inputs of no known split (a bad caption row)
        for item in bar:
            if isinstance(item, Skipped):
                if item.split is None and "all" not in writers:
                    unplaced.append(item)
                else:
                    writer(item.split).skip(item.source, item.reason)
            else:
                writer(route(item)).write(item)
    summaries = {name: w.summary for name, w in writers.items()}
    if unplaced:  # reported with the unsplit series, else the first one
        target = summaries.get("all") or next(iter(summaries.values()), None)
        if target is None:
            target = summaries["all"] = WriteSummary(name="all")
        target.skipped[:0] = [(s.source, s.reason) for s in unplaced]
    return summaries


# ---------------------------------------------------------------------------------------------
# sources


def _split_names(
    n: int, val_fraction: float, test_fraction: float, seed: int, split: str | None
) -> list[str | None]:
    """The split of each input index: `split_indices` when fractions are given, else `split`."""
    if val_fraction or test_fraction:
        if split is not None:
            raise ValueError(
                f"split={split!r} and val_fraction={val_fraction}, test_fraction={test_fraction}: "
                "give one split for all samples or the fractions, not both"
            )
        names: list[str | None] = [None] * n
        for name, indices in split_indices(n, val_fraction, test_fraction, seed=seed).items():
            for i in indices.tolist():
                names[i] = name
        return names
    if split is not None:
        _check_name(split, "split")
    return [split] * n


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of a PIL image (modes PNG cannot hold are converted to RGB)."""
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_file(data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) of an encoded image: JPEG and PNG as they are, others as PNG.

    Raises whatever PIL raises for a file it cannot fully decode.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # structure and checksums
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # the pixels: catches truncated files that verify() lets through
        if image.format == "JPEG":
            return "jpg", data
        if image.format == "PNG":
            return "png", data
        return "png", encode_png(image)


def read_captions(captions_file: str | os.PathLike) -> tuple[dict[str, list[str]], list[Skipped]]:
    """Captions per image path from a CSV (`image,caption`, one row per caption) or a JSONL file
    (`{"image": ..., "caption": ...}` or `"captions": [...]`), in file order.

    Returns the captions (an image may have none, when its rows were empty) and the rows that
    could not be read.
    """
    path = Path(captions_file)
    if not path.is_file():
        raise FileNotFoundError(f"captions_file={str(path)!r} is not a file")
    captions: dict[str, list[str]] = {}
    skipped: list[Skipped] = []

    def add(image: str, texts: Iterable[str]) -> None:
        known = captions.setdefault(PurePosixPath(image.replace("\\", "/")).as_posix(), [])
        known += [t for t in (t.strip() for t in texts) if t and t not in known]

    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"image", "caption"} <= set(reader.fieldnames or ()):
                raise ValueError(
                    f"captions_file={str(path)!r}: a CSV needs the header columns image,caption; "
                    f"found {reader.fieldnames}"
                )
            for row in reader:
                image = (row["image"] or "").strip()
                if not image:
                    skipped.append(Skipped(f"{path.name}:{reader.line_num}", "empty image column"))
                    continue
                add(image, [row["caption"] or ""])
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8-sig") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{line_number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    skipped.append(Skipped(where, f"invalid JSON ({error.msg})"))
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    skipped.append(Skipped(where, 'not an object with an "image" string'))
                    continue
                texts = row.get("captions", [])
                if "caption" in row:
                    texts = [row["caption"], *texts] if isinstance(texts, list) else texts
                if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    skipped.append(Skipped(where, '"caption" must be a string, "captions" a list'))
                    continue
                add(row["image"].strip(), texts)
    else:
        raise ValueError(f"captions_file={str(path)!r} must end in .csv or .jsonl")
    return captions, skipped


def samples_from_image_folder(
    images_dir: str | os.PathLike,
    captions_file: str | os.PathLike,
    *,
    key_prefix: str = "image",
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    split: str | None = None,
) -> Iterator[Sample | Skipped]:
    """Samples from image files and a captions file (see `read_captions`).

    Image paths in the captions file are relative to `images_dir`. Skipped with a reason:
    unreadable caption rows, images listed but missing, images PIL cannot decode, and image
    files in `images_dir` (searched recursively) without a caption. The first caption of an
    image is its `txt`, all of them its `json["captions"]`. The inputs (captioned images in
    file order, then uncaptioned files) are split by index with `split_indices` when a
    fraction is given, else all go to `split` (None: no split). Keys are `key_prefix-NNNNNN`
    by input index, so they do not change when another input turns bad.

    The folder and the captions file are checked when called; images are read while iterating.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images_dir={str(root)!r} is not a folder")
    _check_name(key_prefix, "key_prefix")
    captions, bad_rows = read_captions(captions_file)
    on_disk = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.is_file()
    )
    inputs = list(captions.items()) + [(p, []) for p in on_disk if p not in captions]
    splits = _split_names(len(inputs), val_fraction, test_fraction, seed, split)

    def generate() -> Iterator[Sample | Skipped]:
        yield from bad_rows
        for index, ((relative, texts), name) in enumerate(zip(inputs, splits, strict=True)):
            if not texts:
                yield Skipped(relative, "image without caption", name)
                continue
            path = root / relative
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                yield Skipped(relative, f"image file not found under {root}", name)
                continue
            except OSError as error:
                yield Skipped(relative, f"cannot read the file ({error.strerror})", name)
                continue
            try:
                ext, data = _image_file(data)
            except Exception as error:  # PIL raises many exception types for corrupt files
                yield Skipped(relative, f"not a readable image ({error})", name)
                continue
            meta: dict[str, Any] = {"captions": texts, "source": relative}
            if name is not None:
                meta["split"] = name
            yield {"__key__": f"{key_prefix}-{index:06d}", ext: data, "txt": texts[0], "json": meta}

    return generate()


def _pil_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    from torchvision.transforms.functional import to_pil_image  # arrays (HWC) and tensors (CHW)

    return to_pil_image(image)


def samples_from_classification(
    dataset: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = CLASSIFICATION_TEMPLATES,
    *,
    key_prefix: str = "sample",
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    split: str | None = None,
) -> Iterator[Sample | Skipped]:
    """Samples from a torchvision-style classification dataset: `dataset[i]` = (image, label)
    with a PIL image, an HWC array or a CHW tensor, and an int label.

    Captions come from prompt templates with one `{}` for the class name ("a photo of a {}."):
    all of them in `json["captions"]`, the first as `txt`. Items that raise, labels outside
    `class_names` and images that cannot be converted are skipped with a reason. Splits and
    keys as in `samples_from_image_folder`, over `range(len(dataset))`.
    """
    names = list(class_names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"class_names={names!r} must be a non-empty list of non-empty strings")
    templates = list(templates)
    if not templates:
        raise ValueError("templates must hold at least one template such as 'a photo of a {}.'")
    for template in templates:
        try:
            ok = isinstance(template, str) and template.format("\0").count("\0") == 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"template {template!r} must contain '{{}}' once (for the class name) and no "
                "other braces, e.g. 'a photo of a {}.'"
            )
    _check_name(key_prefix, "key_prefix")
    splits = _split_names(len(dataset), val_fraction, test_fraction, seed, split)

    def generate() -> Iterator[Sample | Skipped]:
        for index, name in enumerate(splits):
            source = f"{key_prefix}[{index}]"
            try:
                image, label = dataset[index]
                label = int(label)
            except Exception as error:  # a user's dataset may raise anything
                yield Skipped(source, f"cannot read (image, label) ({error!r})", name)
                continue
            if not 0 <= label < len(names):
                yield Skipped(source, f"label {label} outside 0..{len(names) - 1}", name)
                continue
            try:
                data = encode_png(_pil_image(image))
            except Exception as error:  # conversion errors vary with the input
                yield Skipped(source, f"cannot encode the image ({error})", name)
                continue
            captions = [t.format(names[label]) for t in templates]
            meta: dict[str, Any] = {
                "label": label,
                "class_name": names[label],
                "captions": captions,
            }
            if name is not None:
                meta["split"] = name
            key = f"{key_prefix}-{index:06d}"
            yield {"__key__": key, "png": data, "txt": captions[0], "json": meta}

    return generate()
