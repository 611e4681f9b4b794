"""Reading webdataset shards: URL expansion, the sample stream of each reader slot, decoding,
batching, skipped-sample accounting and the loader state that makes a resumed run exact.

`build_pipeline` returns an iterable dataset of batches, iterated inside each DataLoader
worker (a *slot*: one rank x one worker)::

    this slot's samples (planned ranges of shards | resampled shards | a weighted mixture)
    -> shuffle buffer (raw samples, seeded by epoch and slot) -> [resume: skip what was read]
    -> decode (explicit handlers) + `map_sample` (augmentations seeded per sample) -> batch

One pass per epoch. With the sample count of every shard known (the writer's manifests, or
the tar headers of local shards), an epoch of a finite stream is one pass: every sample is
read exactly once over all ranks and workers (`multimodal.data.stream_plan`), shards are
reshuffled each epoch, and a batch never holds a sample twice. In training under several
ranks every rank yields the same number of full batches (DDP needs equal steps, feature
gathers equal shapes): at most one batch per rank is padded with samples of another rank.
Evaluation streams (`training=False`) are never padded: ranks may get one batch more or less,
and every sample is scored exactly once. `epoch_length` sets batches per rank per epoch
instead (the pass repeats, reshuffled); `resampled` draws shards with replacement forever.

Exact resume. Everything random is a function of (seed, epoch, slot, sample key): the shard
order, the shuffle buffer and each sample's augmentations (Python, NumPy and torch RNGs are
seeded per sample, by the shard's file name and the key: not by its path, so the same shards
in another folder give the same run). Each batch carries its slot's cursor (raw samples read,
items of the current sample already used, batches yielded). `ShardLoader.state_dict()` holds
the epoch and these cursors (a few integers, whatever the shuffle buffer size); after
`load_state_dict`, each slot re-reads its shards from the start of the epoch, skipping the raw
samples it had read without decoding them (the shuffle buffer is rebuilt from the shards, not
stored), and goes on with exactly the batches the interrupted run would have produced.

Decoding never unpickles: only `jpg`/`jpeg`/`png`/`webp` (PIL), `txt` (UTF-8), `json`
(`json.loads`) and `cls` (an ASCII int) are read from the tars; every other entry of a sample
is ignored before it is even loaded.

Skipped samples. A sample whose image (or text, json, cls) fails to decode, or that lacks a
field the map function needs (it raises `SkipSample`), is skipped, counted by reason and
logged with its shard and key. The counts leave the worker inside the next batch (a
`"skipped"` entry of a dict batch, or the last element of a tuple batch); `ShardLoader` sums
them in the main process into a `SkipCounter`. In training under several ranks a slot that
skipped samples pads its last batch with samples it read first, so batch counts stay equal.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import base_plus_ext

from multimodal.data.shards import MANIFEST_SUFFIX, read_manifest
from multimodal.data.stream_plan import (
    Segment,
    balanced,
    plan_slot,
    rank_ranges,
    shard_order,
    virtual_segments,
    worker_batches,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KNOWN_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, "txt", "json", "cls"))
PIL_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL may only try these decoders
MAX_SKIPS_IN_A_ROW = 10_000  # more consecutive skipped samples means the data or map is wrong
MAX_SKIP_WARNINGS = 20  # per worker and epoch; the rest go to debug (the totals are reported)
RESERVE = 32  # raw samples a slot keeps to pad its last batch after skips (training, DDP)
MAX_WORKERS = 256  # rows of the shared epoch/resume table
EXPECTED_URLS = (
    "a brace pattern such as 'dir/train-{000000..000009}.tar', a list of tar paths or URLs, "
    "a 'pipe:' command such as 'pipe:aws s3 cp s3://bucket/train-000000.tar -', or a "
    "directory holding *.tar shards"
)

Item = Any  # what `map_sample` returns for one training example (a dict or a tuple)
Batch = dict[str, Any] | tuple[Any, ...]
STREAM = "_stream"  # the entry of a dict batch (or key of a tuple batch's meta) with the cursor


class SkipSample(Exception):
    """Raised while decoding or by a `map_sample` function to leave the current sample out.

    `reason` is what is counted ("missing caption"); `detail` only goes to the log.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------
# URLs


def _is_remote(url: str) -> bool:
    scheme = urlparse(url).scheme
    return url.startswith("pipe:") or (len(scheme) > 1 and scheme != "file")


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from brace patterns, globs, lists, local paths, `pipe:` commands and
    directories (all their `*.tar`, sorted).

    Remote URLs (`pipe:`, `http(s)://`, `gs://`, ...) are expanded but not checked. Local
    paths must exist: an empty list, a pattern matching no existing shard, or a missing
    shard raises ValueError naming what was given and what is expected.
    """
    given = [urls] if isinstance(urls, str | os.PathLike) else list(urls)
    if not given:
        raise ValueError(f"urls={urls!r} is empty; expected {EXPECTED_URLS}")
    shards: list[str] = []
    for entry in given:
        if not isinstance(entry, str | os.PathLike):
            raise ValueError(f"urls entry {entry!r} is not a string; expected {EXPECTED_URLS}")
        url = os.fspath(entry).strip()
        if _is_remote(url):
            scheme = "pipe" if url.startswith("pipe:") else urlparse(url).scheme
            if scheme not in gopen_schemes:
                raise ValueError(
                    f"shard URL {url!r}: webdataset cannot open {scheme}:// URLs; use "
                    f"'pipe:<command writing the tar to stdout>' (for S3: "
                    f"'pipe:aws s3 cp {url} -')"
                )
            shards.extend(braceexpand.braceexpand(url))
            continue
        path = url.removeprefix("file://").removeprefix("file:")
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            if not found:
                raise ValueError(
                    f"directory {url!r} holds no *.tar shard; expected {EXPECTED_URLS}"
                )
            shards.extend(found)
            continue
        found, missing = [], []
        for candidate in braceexpand.braceexpand(path):
            if any(char in candidate for char in "*?["):
                found.extend(sorted(glob.glob(candidate)))
            elif os.path.isfile(candidate):
                found.append(candidate)
            else:
                missing.append(candidate)
        if not found or missing:
            listed = ", ".join(repr(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
            what = f"{len(missing)} missing shards ({listed})"
            if not found:
                what = f"no existing shard (looked for {listed})" if missing else "no shard"
            raise ValueError(f"urls entry {url!r} matched {what}; expected {EXPECTED_URLS}")
        shards.extend(found)
    return shards


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class Source:
    """One stream of a weighted mixture: its shards, its share of the draws and a name for
    the logged per-source counts (default: `source0`, `source1`, ...)."""

    urls: str | list[str]
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.urls or (isinstance(self.urls, str) and not self.urls.strip()):
            raise ValueError(f"Source.urls={self.urls!r} is empty; expected {EXPECTED_URLS}")
        if not (isinstance(self.weight, int | float) and math.isfinite(self.weight)) or (
            self.weight <= 0
        ):
            raise ValueError(f"Source.weight={self.weight!r} must be a finite number > 0")


@dataclass
class ShardPipelineConfig:
    """How shards become batches; validated on creation.

    Args:
        urls: shards, in any form `expand_urls` takes (or None with `sources`).
        batch_size: items per batch (batching happens in the pipeline, inside the workers).
        shuffle_shards: shuffle the shard order, with a new order each epoch (seeded, the same
            on every rank).
        shuffle_buffer: raw samples held for shuffling in each worker (0 = off).
        resampled: draw shards with replacement forever; needs `epoch_length`.
        epoch_length: batches per rank per epoch; None = one pass over the shards (needs
            their sample counts under several ranks: manifests or local shards).
        drop_last: drop each rank's last incomplete batch instead of keeping it (one rank,
            evaluation) or padding it (training under several ranks).
        seed: seed of the shard order, the shuffle buffer and the per-sample augmentations.
        training: training stream: under several ranks every rank yields the same number of
            full batches. False (evaluation): each sample exactly once, never padded; ranks may
            yield one batch more or less.
        sources: several streams mixed by weight (each draw picks a source with probability
            weight / sum of weights); an epoch is `epoch_length` batches per rank (default: as
            many as one pass over all the sources' samples).
        one_item_per_sample: `map_sample` returns one item per sample (False for VQA
            evaluation, one item per question): the loader then has a length.
    """

    urls: str | list[str] | None = None
    batch_size: int = 32
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    epoch_length: int | None = None
    drop_last: bool = False
    seed: int = 0
    training: bool = True
    sources: list[Source] | None = None
    one_item_per_sample: bool = True

    def __post_init__(self) -> None:
        prefix = "ShardPipelineConfig."
        if self.sources is not None:
            self.sources = [s if isinstance(s, Source) else Source(**s) for s in self.sources]
            if not self.sources:
                raise ValueError(f"{prefix}sources is empty; expected a list of Source")
            if self.urls is not None:
                raise ValueError(f"{prefix}urls and sources are both set; give one of them")
            names = [s.name for s in self.sources if s.name is not None]
            if len(set(names)) != len(names):
                raise ValueError(f"{prefix}sources have repeated names: {names}")
        elif not self.urls or (isinstance(self.urls, str) and not self.urls.strip()):
            raise ValueError(f"{prefix}urls={self.urls!r} is empty; expected {EXPECTED_URLS}")
        if self.batch_size <= 0:
            raise ValueError(f"{prefix}batch_size={self.batch_size} must be > 0")
        if self.shuffle_buffer < 0:
            raise ValueError(f"{prefix}shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 = off)")
        if self.epoch_length is not None and self.epoch_length <= 0:
            raise ValueError(f"{prefix}epoch_length={self.epoch_length} must be > 0 or None")
        if self.resampled and self.epoch_length is None and self.sources is None:
            raise ValueError(
                f"{prefix}epoch_length=None, but resampled=True draws shards forever; set "
                "epoch_length (batches per rank per epoch)"
            )

    @property
    def source_list(self) -> list[Source]:
        """The sources: `sources`, or one source of `urls`."""
        if self.sources is not None:
            return list(self.sources)
        assert self.urls is not None
        return [Source(self.urls)]

    @property
    def source_names(self) -> list[str]:
        return [s.name or f"source{i}" for i, s in enumerate(self.source_list)]


# ---------------------------------------------------------------------------------------------
# decoding


# ---------------------------------------------------------------------------------------------
# decoding


def _decode_image(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
            return image.convert("RGB")  # loads the pixels now, so corruption shows here
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib errors ...
        message = re.sub(r" <[^>]*>", "", str(error))  # drop "<_io.BytesIO object at 0x...>"
        raise SkipSample("undecodable image", f"{type(error).__name__}: {message}") from error


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SkipSample("undecodable txt", str(error)) from error


def _decode_json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SkipSample("invalid json", str(error)) from error
    if not isinstance(value, dict):
        raise SkipSample("invalid json", f"expected an object, got {type(value).__name__}")
    return value


def _decode_cls(data: bytes) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as error:
        raise SkipSample("invalid cls", f"expected an ASCII integer, got {data[:20]!r}") from error


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "txt": _decode_text,
    "json": _decode_json,
    "cls": _decode_cls,
}


def decode_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A raw tar sample (bytes by extension) -> `{"__key__", "__url__", "image" (RGB PIL
    image), "txt" (str), "json" (dict), "cls" (int)}` with the fields the sample has.

    Only these extensions are decoded, by explicit handlers; any other is dropped unread
    (never unpickled). Undecodable data raises `SkipSample`.
    """
    sample: dict[str, Any] = {"__key__": raw.get("__key__"), "__url__": raw.get("__url__")}
    for ext, value in raw.items():
        if ext in IMAGE_EXTENSIONS:
            if "image" in sample:
                raise SkipSample("several images", "a sample holds more than one image entry")
            sample["image"] = _decode_image(value)
        elif ext in DECODERS:
            sample[ext] = DECODERS[ext](value)
    return sample


def _is_known_file(name: str) -> bool:
    """Whether a tar member is read at all: only the extensions we decode."""
    _, ext = base_plus_ext(name)
    return ext is not None and ext.lower() in KNOWN_EXTENSIONS


# ---------------------------------------------------------------------------------------------
# sample counts


def _manifest_counts(shards: Sequence[str]) -> dict[Path, int]:
    counts: dict[Path, int] = {}
    for folder in {Path(url).parent for url in shards if not _is_remote(url)}:
        for manifest in folder.glob(f"*{MANIFEST_SUFFIX}"):
            for shard in read_manifest(manifest)["shards"]:
                counts[(folder / shard["name"]).resolve()] = int(shard["samples"])
    return counts


def count_tar_samples(path: str) -> int:
    """Samples in a local tar shard, from its member headers (no data is read): the number of
    distinct keys among the members whose extension the reader decodes."""
    keys = set()
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isfile() and _is_known_file(member.name):
                keys.add(base_plus_ext(member.name)[0])
    return len(keys)


def shard_sample_counts(shards: Sequence[str]) -> list[int] | None:
    """Samples in each shard: from the manifests `ShardWriter` leaves next to them, else
    counted from the tar headers of local shards; None when a shard is remote and unlisted."""
    listed = _manifest_counts(shards)
    counts = []
    for url in shards:
        if _is_remote(url):
            return None
        path = Path(url.removeprefix("file://").removeprefix("file:")).resolve()
        if path not in listed:
            try:
                listed[path] = count_tar_samples(str(path))
            except (OSError, tarfile.TarError) as error:
                log.warning("cannot count the samples of shard %s (%s)", url, error)
                return None
        counts.append(listed[path])
    return counts


def manifest_samples(shards: Sequence[str]) -> int | None:
    """Samples in these shards (see `shard_sample_counts`), or None when unknown."""
    counts = shard_sample_counts(shards)
    return None if counts is None else sum(counts)


# ---------------------------------------------------------------------------------------------
# per-slot state


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) outside one."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass
class Cursor:
    """Where a slot stands in its epoch: raw samples read (after the shuffle buffer), items of
    the next raw sample already batched, batches yielded."""

    raw: int = 0
    items: int = 0
    batches: int = 0

    def to_list(self) -> list[int]:
        return [self.raw, self.items, self.batches]


class _PipelineState:
    """What the stages of one pipeline share in one process: rank, epoch, skip counts.

    Every DataLoader worker holds its own copy (the dataset is copied into each worker); the
    epoch and resume cursors come from `shared`, a tensor in shared memory that the main
    process writes, so persistent workers see them too.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        # row 0: [epoch, worker shift, 0, 0]; row 1 + w: [raw, items, batches, epoch + 1 if set]
        self.shared = torch.zeros(MAX_WORKERS + 1, 4, dtype=torch.long).share_memory_()
        self.epoch = -1
        self.skipped: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.warnings = 0
        self.skips_in_a_row = 0
        self.shards_without_sample = 0
        self.shard_reads = 0  # shards opened this epoch
        self.current_shard: str | None = None
        self.failed_read = -1  # the last shard read that hit an error
        self.overflow = 0  # items beyond the epoch's batches (multi-item maps in training)

    def start_epoch(self) -> None:
        self.epoch = int(self.shared[0, 0])
        self.skipped.clear()
        self.sources.clear()
        self.warnings = self.skips_in_a_row = self.shards_without_sample = self.shard_reads = 0
        self.current_shard, self.failed_read, self.overflow = None, -1, 0

    def resume_cursor(self, worker: int) -> Cursor:
        raw, items, batches, epoch = self.shared[1 + worker].tolist()
        return Cursor(raw, items, batches) if epoch == self.epoch + 1 else Cursor()

    def open_shard(self, url: str) -> None:
        self.shard_reads += 1
        self.current_shard = url

    def _warn(self, message: str, *args: Any) -> None:
        self.warnings += 1
        if self.warnings <= MAX_SKIP_WARNINGS:
            log.warning(message, *args)
            if self.warnings == MAX_SKIP_WARNINGS:
                log.warning("further skips in this worker this epoch are logged at debug level")
        else:
            log.debug(message, *args)

    def skip(self, error: SkipSample, raw: Mapping[str, Any]) -> None:
        self.skipped[error.reason] += 1
        self.skips_in_a_row += 1
        detail = f" ({error.detail})" if error.detail else ""
        self._warn(
            "skipped sample %r of shard %s: %s%s",
            raw.get("__key__"),
            raw.get("__url__"),
            error.reason,
            detail,
        )
        if self.skips_in_a_row > MAX_SKIPS_IN_A_ROW:
            raise RuntimeError(
                f"{self.skips_in_a_row} samples in a row were skipped (counts by reason: "
                f"{dict(self.skipped)}); the shards do not hold what the datamodule needs"
            )

    def tar_error(self, error: Exception) -> bool:
        """webdataset's exception handler for tar reading: count (once per shard read), warn
        and go on with the next member or shard."""
        first = str(error.args[0]) if error.args else ""
        message = f"{type(error).__name__}: {first}"
        if self.failed_read == self.shard_reads:  # the same broken read, seen by a later stage
            log.debug("shard %s: %s", self.current_shard, message)
            return True
        self.failed_read = self.shard_reads
        self.skipped["unreadable tar data"] += 1
        self._warn("skipped unreadable tar data in shard %s: %s", self.current_shard, message)
        return True

    def take_skipped(self) -> dict[str, int]:
        counts = dict(self.skipped)
        self.skipped.clear()
        return counts

    def take_sources(self) -> dict[str, int]:
        counts = dict(self.sources)
        self.sources.clear()
        return counts


# ---------------------------------------------------------------------------------------------
# stages


def _read_shard(
    url: str, state: _PipelineState, start: int = 0, stop: int | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples `start <= i < stop` of one shard (bytes by extension, `__key__`,
    `__url__`); the samples before `start` are passed over without being decoded. Broken
    tars and members are skipped by `state.tar_error`."""
    state.open_shard(url)
    samples = wds.tarfile_samples(
        iter([{"url": url}]), handler=state.tar_error, select_files=_is_known_file
    )
    try:
        for index, raw in enumerate(samples):
            if stop is not None and index >= stop:
                break
            if index >= start:
                yield raw
    finally:
        samples.close()


def _read_segments(
    shards: Sequence[str], segments: Iterable[Segment], state: _PipelineState, patience: int
) -> Iterator[dict[str, Any]]:
    """The raw samples of `segments`; reading `patience` shards in a row without a sample
    raises (an endless stream of empty or broken shards)."""
    for segment in segments:
        state.shards_without_sample += 1
        if state.shards_without_sample > patience:
            raise RuntimeError(
                f"read {state.shards_without_sample - 1} shards in a row without finding a "
                "sample (see the warnings above); check the shards"
            )
        for raw in _read_shard(shards[segment.shard], state, segment.start, segment.stop):
            state.shards_without_sample = 0
            yield raw


def _whole(shard: int) -> Segment:
    return Segment(shard, 0, 2**62)


@dataclass
class _SourceStream:
    """The raw samples one slot reads from one source in an epoch."""

    shards: list[str]
    counts: list[int] | None
    seed: str

    def planned(self, config: ShardPipelineConfig, slot: tuple[int, int, int, int], epoch: int):
        """One pass (or `epoch_length` batches) split exactly over the slots."""
        assert self.counts is not None
        rank, world, worker, workers = slot
        plan = plan_slot(
            self.counts,
            rank=rank,
            world_size=world,
            worker=worker,
            num_workers=workers,
            batch_size=config.batch_size,
            epoch=epoch,
            seed=self.seed,
            shuffle=config.shuffle_shards,
            training=config.training,
            drop_last=config.drop_last,
            epoch_length=None if config.resampled else config.epoch_length,
        )
        return plan.segments, plan.batches, plan.full_batches

    def endless(
        self, config: ShardPipelineConfig, slot: tuple[int, int, int, int], epoch: int
    ) -> Iterator[Segment]:
        """Segments forever: resampled shards, or pass after pass (each reshuffled) with this
        slot's balanced share of each pass (by samples with counts, else every n-th shard)."""
        rank, world, worker, workers = slot
        index, n_slots = rank * workers + worker, world * workers
        if config.resampled:
            rng = random.Random(f"{self.seed}:{epoch}:{index}:resampled")
            while True:
                yield _whole(rng.randrange(len(self.shards)))
        for pass_ in itertools.count():
            if self.counts is not None and sum(self.counts) >= n_slots:
                total = sum(self.counts)
                lo, hi = balanced(total, n_slots, index)
                yield from virtual_segments(
                    self.counts,
                    pass_ * total + lo,
                    pass_ * total + hi,
                    seed=self.seed,
                    epoch=epoch,
                    shuffle=config.shuffle_shards,
                )
            else:
                shuffle = config.shuffle_shards
                order = shard_order(len(self.shards), self.seed, epoch, pass_, shuffle)
                yield from (_whole(s) for s in order[index::n_slots])

    def one_pass(
        self, config: ShardPipelineConfig, slot: tuple[int, int, int, int], epoch: int
    ) -> list[Segment]:
        """Unknown sample counts on one rank: every n-th shard of one pass, to the end."""
        rank, world, worker, workers = slot
        order = shard_order(len(self.shards), self.seed, epoch, 0, config.shuffle_shards)
        return [_whole(s) for s in order[rank * workers + worker :: world * workers]]


def _mix(
    streams: list[Iterator[dict[str, Any]]], weights: list[float], rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Raw samples drawn from the streams with probability proportional to their weights."""
    indices = list(range(len(streams)))
    while True:
        source = rng.choices(indices, weights)[0]
        raw = next(streams[source], None)
        if raw is None:
            raise RuntimeError(f"source {source} of the mixture has no samples")
        raw["__source__"] = source
        yield raw


def _shuffle(src: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    # raw samples (compressed bytes) are shuffled, not decoded tensors: a 224 px float image
    # takes ~600 kB, 10-50x its JPEG
    yield from wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)


def shard_name(url: str | None) -> str | None:
    """The file name of a shard URL (`/data/train/a-000.tar`, `s3://b/a-000.tar`,
    `pipe:curl -s https://h/a-000.tar` -> `a-000.tar`): what names a shard wherever its
    dataset lives."""
    if url is None:
        return None
    if url.startswith("pipe:"):
        url = (url.split() or [url])[-1]
    return url.rstrip("/").rsplit("/", 1)[-1]


def sample_seed(seed: int | str, epoch: int, raw: Mapping[str, Any]) -> int:
    """The seed of one sample's augmentations: a function of the sample, not of the slot or
    the time it is read, so that a resumed run transforms it as the uninterrupted one; and of
    the shard's file name, not its path, so that the same shards give the same run wherever
    they are (another checkout, a copy on local disk, a pytest tmp_path)."""
    text = f"{seed}:{epoch}:{shard_name(raw.get('__url__'))}:{raw.get('__key__')}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class _SeededRandomness:
    """Seeds Python's, NumPy's and torch's global RNGs for one sample; in the main process
    (no DataLoader workers) the previous states are restored afterwards, so the model's RNG
    (dropout) does not depend on the data."""

    def __init__(self, seed: int, restore: bool) -> None:
        self.seed, self.restore = seed, restore

    def __enter__(self) -> None:
        # torch's CPU generator directly: torch.manual_seed also queues the seeding of CUDA
        # generators with a stack trace, ~10 ms per call
        if self.restore:
            self.states = (random.getstate(), np.random.get_state(), _TORCH_RNG.get_state())
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        _TORCH_RNG.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self.restore:
            random.setstate(self.states[0])
            np.random.set_state(self.states[1])
            _TORCH_RNG.set_state(self.states[2])


_TORCH_RNG = torch.default_generator


def _map_one(
    raw: dict[str, Any],
    map_sample: Callable[[dict[str, Any]], Item | list[Item]],
    state: _PipelineState,
    seed: int | str,
) -> list[Item] | None:
    """The items of one raw sample, or None when it is skipped (counted and logged)."""
    try:
        with _SeededRandomness(sample_seed(seed, state.epoch, raw), get_worker_info() is None):
            items = map_sample(decode_sample(raw))
    except SkipSample as error:
        state.skip(error, raw)
        return None
    state.skips_in_a_row = 0
    return items if isinstance(items, list) else [items]


def attach_meta(batch: Batch, skipped: dict[str, int], stream: dict[str, Any]) -> Batch:
    """Put skip counts and the slot's stream position into a batch: `"skipped"` and `_stream`
    entries of a dict, or one last tuple element `{"skipped": ..., "_stream": ...}`."""
    if isinstance(batch, dict):
        batch["skipped"] = skipped
        batch[STREAM] = stream
        return batch
    if isinstance(batch, tuple | list):
        return (*batch, {"skipped": skipped, STREAM: stream})
    raise TypeError(f"collate must return a dict or a tuple, got {type(batch).__name__}")


# ---------------------------------------------------------------------------------------------
# the dataset


class ShardPipeline(IterableDataset):
    """The iterable dataset `build_pipeline` returns; one iteration = one epoch of batches of
    this process's slot (see the module docstring). The epoch and resume cursors are set by
    `ShardLoader` through `set_epoch` / `set_resume`."""

    def __init__(
        self,
        config: ShardPipelineConfig,
        map_sample: Callable[[dict[str, Any]], Item | list[Item]],
        collate: Callable[[list[Item]], Batch],
        shards: list[list[str]],
        counts: list[list[int] | None],
        state: _PipelineState,
    ) -> None:
        super().__init__()
        self.config, self.map_sample, self.collate = config, map_sample, collate
        self.shards, self.counts, self.state = shards, counts, state
        self.mixed = config.sources is not None and len(shards) > 1
        self.planned = not self.mixed and counts[0] is not None and not config.resampled
        if self.mixed and config.epoch_length is None and any(c is None for c in counts):
            raise ValueError(
                "ShardPipelineConfig.epoch_length=None with sources whose sample counts are "
                "unknown (remote shards without manifests): set epoch_length"
            )

    @property
    def rank(self) -> int:
        return self.state.rank

    @property
    def world_size(self) -> int:
        return self.state.world_size

    def batches_per_rank(self) -> int | None:
        """Batches this rank yields per epoch (None: unknown, e.g. several items per sample
        in evaluation, or a one-rank pass over shards of unknown size)."""
        config = self.config
        if config.epoch_length is not None:
            return config.epoch_length
        if self.mixed:
            total = sum(sum(c) for c in self.counts if c is not None)
            return max(1, total // (self.world_size * config.batch_size))
        if not self.planned or not config.one_item_per_sample:
            return None
        _, batches, _ = rank_ranges(
            sum(self.counts[0] or []),
            rank=self.rank,
            world_size=self.world_size,
            batch_size=config.batch_size,
            training=config.training,
            drop_last=config.drop_last,
        )
        return batches

    def __len__(self) -> int:
        batches = self.batches_per_rank()
        if batches is None:
            raise TypeError("this shard stream has no known length")
        return batches

    def layout(self) -> dict[str, Any]:
        """What must not change between a checkpoint and its resume."""
        config = self.config
        return {
            "world_size": self.world_size,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "resampled": config.resampled,
            "epoch_length": config.epoch_length,
            "shards": [len(s) for s in self.shards],
            "samples": [None if c is None else sum(c) for c in self.counts],
        }

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch` (seen by persistent workers too)."""
        self.state.shared[0, 0] = epoch

    def set_resume(self, cursors: Mapping[int, Cursor], epoch: int) -> None:
        """Slots continue epoch `epoch` from these cursors (worker -> cursor); none: start."""
        self.state.shared[1:] = 0
        for worker, cursor in cursors.items():
            self.state.shared[1 + worker] = torch.tensor([*cursor.to_list(), epoch + 1])

    def set_worker_shift(self, shift: int) -> None:
        """DataLoader worker p plays slot (p + shift) % workers this epoch. The DataLoader
        always asks worker 0 first; an epoch resumed after `consumed` batches must go on with
        the slot whose turn it was: shift = consumed % workers."""
        self.state.shared[0, 1] = shift

    def _slot(self) -> tuple[int, int, int, int]:
        worker, workers = _worker()
        if workers > MAX_WORKERS:
            raise ValueError(f"num_workers={workers} > {MAX_WORKERS} is not supported")
        worker = (worker + int(self.state.shared[0, 1])) % workers
        return self.rank, self.world_size, worker, workers

    def _raw_stream(self, slot: tuple[int, int, int, int]):
        """(raw samples of this slot's epoch, its batches or None = until the end, whether
        every batch must be full)."""
        config, state, epoch = self.config, self.state, self.state.epoch
        rank, world, worker, workers = slot
        patience = 10 * sum(len(s) for s in self.shards) + 10
        streams = [
            _SourceStream(shards, counts, f"{config.seed}:{i}" if self.mixed else config.seed)
            for i, (shards, counts) in enumerate(zip(self.shards, self.counts, strict=True))
        ]
        if self.planned:
            segments, batches, full = streams[0].planned(config, slot, epoch)
            if not config.training:  # evaluation: every item of the slot's samples, no quota
                batches = None
            return _read_segments(self.shards[0], segments, state, patience), batches, full
        total = self.batches_per_rank()
        quota = None if total is None else worker_batches(total, workers, worker)
        full = config.training and world > 1
        if not self.mixed:
            if total is None:  # one rank, unknown sizes: one pass of whole shards
                segments = streams[0].one_pass(config, slot, epoch)
            else:
                segments = streams[0].endless(config, slot, epoch)
            return _read_segments(self.shards[0], segments, state, patience), quota, full
        readers = [
            _read_segments(s.shards, s.endless(config, slot, epoch), state, patience)
            for s in streams
        ]
        weights = [float(s.weight) for s in config.source_list]
        rng = random.Random(f"{config.seed}:{epoch}:{rank}:{worker}:mix")
        return _mix(readers, weights, rng), quota, full

    def __iter__(self) -> Iterator[Batch]:
        # not a generator function: the epoch and resume cursor are read now (in the worker,
        # or in the main process when iter() is called), not at the first batch
        self.state.start_epoch()
        slot = self._slot()
        cursor = self.state.resume_cursor(slot[2])
        raw, batches, full = self._raw_stream(slot)
        if self.config.shuffle_buffer > 0:
            rng = random.Random(f"{self.config.seed}:{self.state.epoch}:{slot[0]}:{slot[2]}:buf")
            raw = _shuffle(raw, self.config.shuffle_buffer, rng)
        return self._batches(raw, cursor, batches, full, slot[2])

    def _batches(
        self,
        raw_stream: Iterator[dict[str, Any]],
        cursor: Cursor,
        quota: int | None,
        full: bool,
        worker: int,
    ) -> Iterator[Batch]:
        """Decode, map and batch; each batch carries the cursor after its last item."""
        config, state = self.config, self.state
        names = config.source_names
        size = config.batch_size
        reserve: list[dict[str, Any]] = []  # the first raw samples, to pad after skips
        done = cursor.batches
        pending: list[Item] = []
        ready: tuple[Batch, dict[str, Any]] | None = None  # held until the next item arrives

        def finish(items: list[Item], position: Cursor) -> tuple[Batch, dict[str, Any]]:
            return self.collate(items), {"worker": worker, "epoch": state.epoch, **vars(position)}

        def emit(entry: tuple[Batch, dict[str, Any]]) -> Batch:
            batch, stream = entry
            stream["sources"] = state.take_sources()
            return attach_meta(batch, state.take_skipped(), stream)

        if quota is not None and done >= quota:
            return
        position = Cursor(cursor.raw, cursor.items, done)
        for index, raw in enumerate(raw_stream):
            if len(reserve) < RESERVE:
                reserve.append(raw)
            if index < cursor.raw:
                continue  # read before the interruption: not decoded again
            items = _map_one(raw, self.map_sample, state, config.seed)
            if items is None:
                position = Cursor(index + 1, 0, done)
                continue
            first = cursor.items if index == cursor.raw else 0
            for j in range(first, len(items)):
                if ready is not None:
                    yield emit(ready)
                    ready = None
                if quota is not None and done >= quota:
                    state.overflow += len(items) - j
                    break
                pending.append(items[j])
                if "__source__" in raw:
                    state.sources[names[raw["__source__"]]] += 1
                elif len(names) == 1 and config.sources is not None:
                    state.sources[names[0]] += 1
                position = Cursor(index + (j + 1 == len(items)), (j + 1) % len(items), done)
                if len(pending) == size:
                    done += 1
                    position.batches = done
                    ready, pending = finish(pending, position), []
            if quota is not None and done >= quota:
                break
        if state.overflow:
            log.warning(
                "rank %d worker %d: %d items beyond this epoch's %s batches were left out (a "
                "map returning several items per sample in training)",
                state.rank,
                worker,
                state.overflow,
                quota,
            )
        if full and quota is not None and (pending or done < quota):
            pending = self._pad(pending, reserve, quota - done, worker)
            while pending:
                if ready is not None:
                    yield emit(ready)
                done += 1
                position = Cursor(position.raw, position.items, done)
                ready, pending = finish(pending[:size], position), pending[size:]
        elif pending and not config.drop_last:
            done += 1
            position.batches = done
            if ready is not None:
                yield emit(ready)
            ready = finish(pending, position)
        if ready is not None:
            yield emit(ready)

    def _pad(
        self, pending: list[Item], reserve: list[dict[str, Any]], batches: int, worker: int
    ) -> list[Item]:
        """`pending` filled up to `batches` full batches with the items of the slot's first
        raw samples (after samples were skipped): DDP ranks must step the same batches."""
        needed = batches * self.config.batch_size - len(pending)
        extra: list[Item] = []
        for raw in itertools.islice(itertools.cycle(reserve), 4 * RESERVE + needed):
            if len(extra) >= needed:
                break
            items = _map_one(raw, self.map_sample, self.state, self.config.seed)
            extra += items or []
        if len(extra) < needed:
            raise RuntimeError(
                f"rank {self.rank} worker {worker}: {needed} items are missing to fill this "
                "epoch's batches and no readable sample is left to pad them with"
            )
        log.info(
            "rank %d worker %d: padded %d items after skipped samples (equal batches per rank)",
            self.rank,
            worker,
            needed,
        )
        return pending + extra[:needed]


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's when initialised, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"pass both rank and world_size or neither, got {rank=}, {world_size=}")
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = 0, 1
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                log.warning(
                    "WORLD_SIZE=%s but torch.distributed is not initialised: this pipeline "
                    "reads all shards on this rank; build it after the process group starts "
                    "(the datamodules do, in train_dataloader) or pass rank and world_size",
                    os.environ["WORLD_SIZE"],
                )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return rank, world_size


def build_pipeline(
    config: ShardPipelineConfig,
    map_sample: Callable[[dict[str, Any]], Item | list[Item]],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    collate: Callable[[list[Item]], Batch] = default_collate,
) -> ShardPipeline:
    """The iterable dataset of batches for `config`; iterate it in a `ShardLoader` (which sets
    the epoch and carries the resume state).

    Args:
        config: shards or sources, shuffling, batch size, epoch length, training or evaluation.
        map_sample: decoded sample (see `decode_sample`) -> one item or a list of items (one
            per VQA question, say); runs in the workers, with Python/NumPy/torch RNGs seeded
            for the sample. It raises `SkipSample(reason)` to leave a sample out (a missing
            caption). Must be picklable for spawned workers.
        rank, world_size: this process's place among the data-parallel ranks; by default
            from torch.distributed when it is initialised, else a single rank.
        collate: list of items -> a dict batch (gets `"skipped"` and `_stream` entries) or a
            tuple batch (gets them in one last element, which `ShardLoader` removes).
    """
    rank, world_size = resolve_rank(rank, world_size)
    shards = [expand_urls(source.urls) for source in config.source_list]
    counts = [shard_sample_counts(s) for s in shards]
    state = _PipelineState(rank, world_size)
    dataset = ShardPipeline(config, map_sample, collate, shards, counts, state)
    if config.sources is None and not config.resampled and config.epoch_length is None:
        if counts[0] is None and world_size > 1:
            raise ValueError(
                f"{world_size} ranks read {len(shards[0])} shards whose sample counts are "
                "unknown (remote, no manifest from ShardWriter next to them): set epoch_length "
                "(batches per rank per epoch) so that every rank steps the same number of batches"
            )
        if counts[0] is not None and sum(counts[0]) < world_size:
            raise ValueError(
                f"{sum(counts[0])} samples in {config.urls!r} cannot give each of "
                f"{world_size} ranks one"
            )
    return dataset


# ---------------------------------------------------------------------------------------------
# main process: loader, skip counts and resume state


class SkipCounter:
    """Sums the skip counts that batches carry from the workers, by reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, counts: Mapping[str, int]) -> None:
        self.counts.update(counts)

    def take(self) -> dict[str, int]:
        """The counts so far, by reason; resets them."""
        counts = dict(self.counts)
        self.counts.clear()
        return counts

    def report(self, what: str = "data") -> dict[str, int]:
        """`take()`, with a warning giving the total and the count by reason if any."""
        counts = self.take()
        if counts:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
            log.warning("%s: skipped %d samples (%s)", what, sum(counts.values()), reasons)
        return counts


def split_meta(batch: Batch) -> tuple[Batch, dict[str, int], dict[str, Any]]:
    """(the batch without its stream entry or meta element, skip counts, stream position)."""
    if isinstance(batch, dict):
        return batch, batch.get("skipped", {}), batch.pop(STREAM, {})
    if isinstance(batch, tuple | list) and batch and isinstance(batch[-1], Mapping):
        meta = batch[-1]
        return tuple(batch[:-1]), meta.get("skipped", {}), meta.get(STREAM, {})
    raise TypeError(
        "expected a dict batch or a tuple ending in the pipeline's meta, got "
        f"{type(batch).__name__}"
    )


class LoaderProgress(Protocol):
    """Where the training loop stands: its epoch and the batches of it the loop has taken
    (the loop may have fetched more: Lightning prefetches one)."""

    def epoch(self) -> int: ...

    def consumed(self) -> int: ...


STATE_VERSION = 1


class ShardLoader(DataLoader):
    """A DataLoader over a `ShardPipeline`: batches come from the pipeline (`batch_size=None`),
    skip counts are summed in `skip_counter` and per-source counts in `source_counts`, each
    iteration sets the pipeline's epoch, and `state_dict` / `load_state_dict` make a resumed
    epoch continue with exactly the batches an uninterrupted one would have yielded
    (Lightning stores them in every checkpoint).

    Tuple batches lose their trailing meta element here, so `images, labels = batch` works;
    dict batches keep their `"skipped"` entry.

    Args:
        progress: where the training loop stands (`epoch()`, `consumed()`); without it the
            epoch counts the iterations and the state counts the batches yielded.
    """

    def __init__(
        self,
        dataset: ShardPipeline,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: Any = None,
        worker_init_fn: Callable[[int], None] | None = None,
        progress: LoaderProgress | None = None,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
            worker_init_fn=worker_init_fn,
        )
        self.skip_counter = SkipCounter()
        self.source_counts: Counter[str] = Counter()
        self.progress = progress
        self.epoch = -1
        self._resume: dict[str, Any] | None = None
        self._yielded = 0
        self._cursors: dict[int, Cursor] = {}
        self._history: list[tuple[int, int, Cursor | None]] = []  # (index, worker, before)

    def _layout(self) -> dict[str, Any]:
        return {**self.dataset.layout(), "num_workers": self.num_workers}

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the batches of it the loop has taken and each worker's cursor as of
        then: a few integers, whatever the shuffle buffer holds."""
        consumed = self.progress.consumed() if self.progress is not None else self._yielded
        consumed = max(0, min(consumed, self._yielded))
        cursors = dict(self._cursors)
        for index, worker, before in reversed(self._history):
            if index < consumed:
                break
            if before is None:
                cursors.pop(worker, None)
            else:
                cursors[worker] = before
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": consumed,
            "cursors": {str(w): c.to_list() for w, c in sorted(cursors.items())},
            "layout": self._layout(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` at the next iteration; the layout (ranks, workers, batch
        size, shards, seed) must be the one it was saved with."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not supported")
        saved, now = dict(state["layout"]), self._layout()
        if saved != now:
            changed = ", ".join(
                f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)
            )
            raise ValueError(
                f"cannot resume the shard stream exactly: the loader changed since the "
                f"checkpoint ({changed}); resume with the same data, devices and num_workers"
            )
        self._resume = dict(state)
        epoch, consumed = state["epoch"], state["consumed"]
        log.info("the shard stream resumes in epoch %d after %d batches", epoch, consumed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        resume, self._resume = self._resume, None
        cursors: dict[int, Cursor] = {}
        consumed = 0
        if resume is not None:
            self.epoch = int(resume["epoch"])
            consumed = int(resume["consumed"])
            total = self.dataset.batches_per_rank()
            if total is not None and consumed >= total:
                self.epoch, consumed = self.epoch + 1, 0
            else:
                cursors = {int(w): Cursor(*c) for w, c in resume["cursors"].items()}
        elif self.progress is not None:
            self.epoch = self.progress.epoch()
        else:
            self.epoch += 1
        self.dataset.set_epoch(self.epoch)
        self.dataset.set_resume(cursors, self.epoch)
        self.dataset.set_worker_shift(consumed % max(1, self.num_workers))
        self._cursors, self._yielded, self._history = dict(cursors), consumed, []
        return self._batches(super().__iter__())

    def _batches(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            batch, skipped, stream = split_meta(batch)
            self.skip_counter.add(skipped)
            self.source_counts.update(stream.get("sources", {}))
            if stream:
                worker = int(stream["worker"])
                before = self._cursors.get(worker)
                self._cursors[worker] = Cursor(stream["raw"], stream["items"], stream["batches"])
                self._history = [*self._history[-63:], (self._yielded, worker, before)]
            self._yielded += 1
            yield batch
