"""Reading webdataset shards: URL expansion, the sample pipeline and skipped-sample accounting.

`build_pipeline` chains webdataset stages into one iterable dataset, run inside each DataLoader
worker::

    shard URLs (one pass, repeated passes, or resampled; reshuffled per epoch, the same order
    on every rank) -> split by node -> split by worker -> tar reading (broken tars are skipped)
    -> shuffle buffer (raw samples) -> decode (explicit handlers) + `map_sample` -> batch
    -> epoch length

Decoding never unpickles: only `jpg`/`jpeg`/`png`/`webp` (PIL), `txt` (UTF-8), `json`
(`json.loads`) and `cls` (an ASCII int) are read from the tars; every other entry of a sample
is ignored before it is even loaded.

Exactly once or equal length. Without `epoch_length`, each epoch is one pass over the shards
and shards (not samples) are split over ranks x workers, so every sample arrives exactly once
per epoch, but ranks may get different numbers of batches. With `epoch_length`, the shard
stream repeats (each pass reshuffled) or is resampled forever, the infinite stream is split
over ranks x workers, and every rank yields exactly `epoch_length` batches per epoch: what
DDP training needs (every rank must take the same number of steps).

Skipped samples. A sample whose image (or text, json, cls) fails to decode, or that lacks a
field the map function needs (it raises `SkipSample`), is skipped, counted by reason and
logged with its shard and key. The counts leave the worker inside the next batch (a
`"skipped"` entry of a dict batch, or the last element of a tuple batch); `ShardLoader` sums
them in the main process into a `SkipCounter`.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, default_collate, get_worker_info
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import base_plus_ext

from multimodal.data.shards import MANIFEST_SUFFIX, read_manifest

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KNOWN_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, "txt", "json", "cls"))
PIL_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL may only try these decoders
MAX_SKIPS_IN_A_ROW = 10_000  # more consecutive skipped samples means the data or map is wrong
MAX_SKIP_WARNINGS = 20  # per worker and epoch; the rest go to debug (the totals are reported)
EXPECTED_URLS = (
    "a brace pattern such as 'dir/train-{000000..000009}.tar', a list of tar paths or URLs, "
    "a 'pipe:' command such as 'pipe:aws s3 cp s3://bucket/train-000000.tar -', or a "
    "directory holding *.tar shards"
)

Item = Any  # what `map_sample` returns for one training example (a dict or a tuple)
Batch = dict[str, Any] | tuple[Any, ...]


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
class ShardPipelineConfig:
    """How shards become batches; validated on creation.

    Args:
        urls: shards, in any form `expand_urls` takes.
        batch_size: items per batch (batching happens in the pipeline, inside the workers).
        shuffle_shards: shuffle the shard order, with a new order each epoch (seeded, the same
            on every rank).
        shuffle_buffer: raw samples held for shuffling in each worker (0 = off).
        resampled: draw shards with replacement forever (multi-node training on many shards);
            needs `epoch_length`.
        epoch_length: batches per rank per epoch. Every rank yields exactly this many, the
            shard stream repeating as needed; None = one pass over the shards. Each epoch
            starts a new shuffled stream: an epoch shorter than a pass sees part of the
            shards, another part the next epoch.
        drop_last: drop each worker's last incomplete batch (keep it for evaluation).
        seed: seed of the shard order and the shuffle buffer.
    """

    urls: str | list[str]
    batch_size: int = 32
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    epoch_length: int | None = None
    drop_last: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        prefix = "ShardPipelineConfig."
        if not self.urls or (isinstance(self.urls, str) and not self.urls.strip()):
            raise ValueError(f"{prefix}urls={self.urls!r} is empty; expected {EXPECTED_URLS}")
        if self.batch_size <= 0:
            raise ValueError(f"{prefix}batch_size={self.batch_size} must be > 0")
        if self.shuffle_buffer < 0:
            raise ValueError(f"{prefix}shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 = off)")
        if self.epoch_length is not None and self.epoch_length <= 0:
            raise ValueError(f"{prefix}epoch_length={self.epoch_length} must be > 0 or None")
        if self.resampled and self.epoch_length is None:
            raise ValueError(
                f"{prefix}epoch_length=None, but resampled=True draws shards forever; set "
                "epoch_length (batches per rank per epoch)"
            )

    @property
    def infinite(self) -> bool:
        """Whether the shard stream is endless (cut by `epoch_length`)."""
        return self.epoch_length is not None


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
# pipeline stages (module-level functions bound with partial, so that workers can pickle them)


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the calling DataLoader worker; (0, 1) outside one."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _PipelineState:
    """What the stages of one pipeline share in one process: rank, epoch, skip counts.

    Every DataLoader worker holds its own copy (the dataset is copied into each worker).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.epoch = -1
        self.skipped: Counter[str] = Counter()
        self.warnings = 0
        self.skips_in_a_row = 0
        self.shards_without_sample = 0
        self.shard_reads = 0  # shards opened this epoch
        self.current_shard: str | None = None
        self.failed_read = -1  # the last shard read that hit an error

    def start_epoch(self) -> None:
        self.epoch += 1
        self.skipped.clear()
        self.warnings = self.skips_in_a_row = self.shards_without_sample = self.shard_reads = 0
        self.current_shard, self.failed_read = None, -1

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


class _ShardStream:
    """First stage: the shard URLs of this epoch as `dict(url=...)`, identical on every rank
    and worker (seeded by `seed` and the epoch), so that splitting them is consistent."""

    def __init__(self, shards: list[str], config: ShardPipelineConfig, state: _PipelineState):
        self.shards, self.config, self.state = shards, config, state

    def __call__(self) -> Iterator[dict[str, str]]:
        seed, epoch = self.config.seed, self.state.epoch
        if self.config.resampled:
            rng = random.Random(f"{seed}:{epoch}:resampled")
            while True:
                yield {"url": rng.choice(self.shards)}
        passes = itertools.count() if self.config.infinite else range(1)
        for n in passes:
            order = list(self.shards)
            if self.config.shuffle_shards:
                random.Random(f"{seed}:{epoch}:{n}").shuffle(order)
            for url in order:
                yield {"url": url}


def _split_by_node(src: Iterable[dict], state: _PipelineState) -> Iterator[dict]:
    yield from itertools.islice(src, state.rank, None, state.world_size)


def _split_by_worker(src: Iterable[dict]) -> Iterator[dict]:
    worker, n_workers = _worker()
    yield from itertools.islice(src, worker, None, n_workers)


def _read_tars(
    src: Iterable[dict], state: _PipelineState, patience: int | None
) -> Iterator[dict[str, Any]]:
    """Shards -> raw samples (bytes by extension, `__key__`, `__url__`); broken tars and
    members are skipped by `state.tar_error`. With `patience`, reading that many shards in a
    row without a sample raises (an endless stream of empty or broken shards)."""

    def counted(shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            state.open_shard(shard["url"])
            state.shards_without_sample += 1
            if patience is not None and state.shards_without_sample > patience:
                raise RuntimeError(
                    f"read {state.shards_without_sample - 1} shards in a row without finding "
                    "a sample (see the warnings above); check the shards"
                )
            yield shard

    for raw in wds.tarfile_samples(
        counted(src), handler=state.tar_error, select_files=_is_known_file
    ):
        state.shards_without_sample = 0
        yield raw


def _shuffle(src: Iterator, state: _PipelineState, bufsize: int, seed: int) -> Iterator:
    worker, _ = _worker()
    rng = random.Random(f"{seed}:{state.epoch}:{state.rank}:{worker}:samples")
    yield from wds.shuffle(bufsize, initial=bufsize, rng=rng)(src)


def _decode_and_map(
    src: Iterable[dict[str, Any]],
    map_sample: Callable[[dict[str, Any]], Item | list[Item]],
    state: _PipelineState,
) -> Iterator[Item]:
    for raw in src:
        try:
            items = map_sample(decode_sample(raw))
        except SkipSample as error:
            state.skip(error, raw)
            continue
        state.skips_in_a_row = 0
        if isinstance(items, list):
            yield from items
        else:
            yield items


def attach_skipped(batch: Batch, counts: dict[str, int]) -> Batch:
    """Put skip counts into a batch: a `"skipped"` entry of a dict, or a last tuple element."""
    if isinstance(batch, dict):
        batch["skipped"] = counts
        return batch
    if isinstance(batch, tuple | list):
        return (*batch, counts)
    raise TypeError(f"collate must return a dict or a tuple, got {type(batch).__name__}")


def _batch(
    src: Iterable[Item],
    state: _PipelineState,
    batch_size: int,
    collate: Callable[[list[Item]], Batch],
    drop_last: bool,
) -> Iterator[Batch]:
    """Collate `batch_size` items at a time; each batch carries the skips seen until the
    next batch starts (a batch is held back until then, so that the last one carries all)."""
    ready: Batch | None = None
    pending: list[Item] = []
    for item in src:
        if ready is not None:
            yield attach_skipped(ready, state.take_skipped())
            ready = None
        pending.append(item)
        if len(pending) == batch_size:
            ready, pending = collate(pending), []
    tail = collate(pending) if pending and not drop_last else None
    if ready is not None:
        yield attach_skipped(ready, {} if tail is not None else state.take_skipped())
    if tail is not None:
        yield attach_skipped(tail, state.take_skipped())


def _take(src: Iterable[Batch], epoch_length: int) -> Iterator[Batch]:
    """This worker's share of the rank's `epoch_length` batches (the shares sum exactly)."""
    worker, n_workers = _worker()
    quota = epoch_length // n_workers + (worker < epoch_length % n_workers)
    yield from itertools.islice(src, quota)


# ---------------------------------------------------------------------------------------------
# the dataset


class ShardPipeline(wds.DataPipeline):
    """The iterable dataset `build_pipeline` returns; one iteration = one epoch of batches.

    The epoch (which seeds the shard order and the shuffle buffer) counts the iterations in
    each process; `set_epoch` sets it (`ShardLoader` does, so that workers that are not
    persistent also see a new order each epoch).
    """

    def __init__(self, *stages: Any, state: _PipelineState, config: ShardPipelineConfig) -> None:
        super().__init__(*stages)
        self.state, self.config = state, config

    @property
    def rank(self) -> int:
        return self.state.rank

    @property
    def world_size(self) -> int:
        return self.state.world_size

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch`."""
        self.state.epoch = epoch - 1

    def __iter__(self) -> Iterator[Batch]:
        self.state.start_epoch()
        return super().__iter__()


class SizedShardPipeline(ShardPipeline):
    """A `ShardPipeline` with `epoch_length`: `len()` is the batches per rank per epoch."""

    def __len__(self) -> int:
        return int(self.config.epoch_length or 0)


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


def manifest_samples(shards: Sequence[str]) -> int | None:
    """Samples in these local shards according to the manifests `ShardWriter` leaves next
    to them, or None when a shard is remote or not listed in a manifest."""
    counts: dict[Path, int] = {}
    for folder in {Path(url).parent for url in shards if not _is_remote(url)}:
        for manifest in folder.glob(f"*{MANIFEST_SUFFIX}"):
            for shard in read_manifest(manifest)["shards"]:
                counts[(folder / shard["name"]).resolve()] = int(shard["samples"])
    try:
        return sum(counts[Path(url).resolve()] for url in shards)
    except KeyError:
        return None


def equal_batches_per_rank(config: ShardPipelineConfig, world_size: int) -> ShardPipelineConfig:
    """Give a config without an epoch length one from the manifests' sample counts, so that
    the loader has a length (progress bars, schedules) and, under DDP, every rank steps the
    same number of batches: DDP hangs at the first collective a rank misses. Each rank's
    shards repeat to fill the epoch, as DistributedSampler pads with repeated samples.
    Without manifests one rank reads one pass; several ranks need `epoch_length`."""
    if config.infinite:
        return config
    shards = expand_urls(config.urls)
    total = manifest_samples(shards)
    if world_size == 1 and not config.drop_last:
        return config  # one rank evaluating: one exact pass, no repeated samples
    if total is None:
        if world_size == 1:
            return config
        raise ValueError(
            f"{world_size} ranks read {len(shards)} shards whose sample counts are unknown (no "
            "manifest from ShardWriter next to them): set epoch_length (batches per rank per "
            "epoch) so that every rank steps the same number of batches"
        )
    per_rank = total // (world_size * config.batch_size)
    if not config.drop_last:
        per_rank = -(-total // (world_size * config.batch_size))
    log.info(
        "%d samples on %d ranks: epoch_length=%d batches per rank", total, world_size, per_rank
    )
    return replace(config, epoch_length=max(1, per_rank))


def build_pipeline(
    config: ShardPipelineConfig,
    map_sample: Callable[[dict[str, Any]], Item | list[Item]],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    collate: Callable[[list[Item]], Batch] = default_collate,
) -> ShardPipeline:
    """The iterable dataset of batches for `config`; iterate it in a `ShardLoader` (or a
    `DataLoader(batch_size=None)`).

    Args:
        config: shards, shuffling, batch size, epoch length.
        map_sample: decoded sample (see `decode_sample`) -> one item or a list of items (one
            per VQA question, say); runs in the workers. It raises `SkipSample(reason)` to leave
            a sample out (a missing caption). Must be picklable for spawned workers.
        rank, world_size: this process's place among the data-parallel ranks; by default
            from torch.distributed when it is initialised, else a single rank.
        collate: list of items -> a dict batch (gets a `"skipped"` entry) or a tuple batch
            (gets the skip counts as its last element).
    """
    shards = expand_urls(config.urls)
    rank, world_size = resolve_rank(rank, world_size)
    if not config.infinite and len(shards) < world_size:
        log.warning(
            "%d shards for %d ranks: some ranks get no data; write more shards or set "
            "epoch_length so that every rank gets the same number of batches",
            len(shards),
            world_size,
        )
    state = _PipelineState(rank, world_size)
    stages: list[Any] = [
        _ShardStream(shards, config, state),
        partial(_split_by_node, state=state),
        _split_by_worker,
        partial(
            _read_tars, state=state, patience=10 * len(shards) + 10 if config.infinite else None
        ),
    ]
    if config.shuffle_buffer > 0:
        # raw samples (compressed bytes) are shuffled, not decoded tensors: a 224 px float
        # image takes ~600 kB, 10-50x its JPEG
        stages.append(
            partial(_shuffle, state=state, bufsize=config.shuffle_buffer, seed=config.seed)
        )
    stages.append(partial(_decode_and_map, map_sample=map_sample, state=state))
    stages.append(
        partial(
            _batch,
            state=state,
            batch_size=config.batch_size,
            collate=collate,
            drop_last=config.drop_last,
        )
    )
    if config.epoch_length is not None:
        stages.append(partial(_take, epoch_length=config.epoch_length))
        return SizedShardPipeline(*stages, state=state, config=config)
    return ShardPipeline(*stages, state=state, config=config)


# ---------------------------------------------------------------------------------------------
# main process: loader and skip counts


class SkipCounter:
    """Sums the skip counts that batches carry from the workers, by reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, counts: Mapping[str, int]) -> None:
        self.counts.update(counts)

    def consume(self, batch: Batch) -> Batch:
        """Add a batch's counts; returns the batch (a tuple loses its counts element, a dict
        keeps its `"skipped"` entry)."""
        if isinstance(batch, dict):
            self.add(batch.get("skipped", {}))
            return batch
        if isinstance(batch, tuple | list) and batch and isinstance(batch[-1], Mapping):
            self.add(batch[-1])
            return tuple(batch[:-1])
        raise TypeError(
            f"expected a dict batch with 'skipped' or a tuple ending in skip counts, got "
            f"{type(batch).__name__}"
        )

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


class ShardLoader(DataLoader):
    """A DataLoader over a `ShardPipeline`: batches come from the pipeline (`batch_size=None`),
    skip counts are summed in `skip_counter`, and each iteration sets the pipeline's epoch.

    Tuple batches lose their trailing skip counts here, so `images, labels = batch` works;
    dict batches keep their `"skipped"` entry.
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
        self.epoch = -1

    def __iter__(self) -> Iterator[Batch]:
        self.epoch += 1
        self.dataset.set_epoch(self.epoch)  # copied into workers that start now
        for batch in super().__iter__():
            yield self.skip_counter.consume(batch)
