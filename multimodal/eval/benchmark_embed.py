"""Embedding one dataset for `multimodal benchmark`, in this process or in several
(`--devices N`): the evaluation commands' loader (`eval_loader`) and embedding functions
(`embed_labelled_images`, `embed_images_and_captions`) over the whole data or one slice of it.

With N processes (torch.distributed, gloo), rank 0 is the benchmark itself and ranks 1..N-1 are
workers it spawns. For each dataset to embed, rank 0 broadcasts (model, data spec, caption
mode); every rank embeds a contiguous balanced slice (`split_range`: samples of an ImageFolder,
torchvision or CSV / JSONL source; whole shards of shard data, which cannot be split by sample
without reading them), and rank 0 gathers the parts in rank order and concatenates them, so the
result has every sample exactly once, in the order of one process. Workers load a model only
when it has something to embed. Objects cross processes pickled by torch.distributed between
these processes only (never read from a file).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from multimodal.eval.datasets import ImageSamples, open_samples, parse_spec
from multimodal.eval.embedding_cache import Embeddings
from multimodal.eval.evaluate import (
    EvalLoader,
    embed_images_and_captions,
    embed_labelled_images,
    eval_loader,
)
from multimodal.eval.loading import LoadedModel

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting longer than this fails


@dataclass
class RunOptions:
    """How cells are evaluated: batch size, loader workers, autocast precision, device."""

    batch_size: int = 256
    num_workers: int = 2
    precision: str = "fp32"
    device: str = "cpu"
    progress: bool = True


class _Recorder:
    """Iterates a loader, recording each batch's keys and labels (and keeping its length)."""

    def __init__(self, loader: EvalLoader) -> None:
        self.loader = loader
        self.keys: list[str] = []
        self.labels: list[Tensor] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.keys.extend(batch["keys"])
            self.labels.append(batch["labels"].cpu())
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def embed_data(
    loaded: LoadedModel,
    data: str | list[str] | ImageSamples,
    captions: str | None,
    options: RunOptions,
    what: str,
) -> Embeddings:
    """A model's embeddings of data (shards or opened samples): images and labels
    (`embed_labelled_images`), plus every caption when `captions` is a caption mode
    (`embed_images_and_captions`). `what` names the data in skip warnings."""
    loader = eval_loader(
        data, loaded, batch_size=options.batch_size, num_workers=options.num_workers
    )
    recorder = _Recorder(loader)
    if captions is None:
        features, labels, _ = embed_labelled_images(
            loaded, recorder, precision=options.precision, progress=options.progress
        )
        embeddings = Embeddings(features.cpu(), labels.cpu(), recorder.keys)
    else:
        features, text_features, text_image, keys, texts = embed_images_and_captions(
            loaded, recorder, captions=captions, precision=options.precision,
            batch_size=options.batch_size, progress=options.progress,
        )  # fmt: skip
        embeddings = Embeddings(
            features.cpu(), torch.cat(recorder.labels), keys, captions=captions, texts=texts,
            text_features=text_features.cpu(), text_image=text_image.cpu(),
        )  # fmt: skip
    embeddings.skipped = loader.skip_counter.report(what)
    return embeddings


# --------------------------------------------------------------------------- slices


def split_range(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous share of n items; shares differ by at most one
    and the first ranks take the larger ones."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SliceSamples(ImageSamples):
    """Samples [start, stop) of opened samples (same spec and class names)."""

    def __init__(self, samples: ImageSamples, start: int, stop: int) -> None:
        super().__init__(samples.spec, samples.class_map)
        self.samples = samples
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.samples[self.start + index]


def data_slice(spec: str, world_size: int, rank: int) -> list[str] | SliceSamples | None:
    """`rank`'s part of the data of `spec`: a slice of its samples, or of its shards; None
    when the part is empty (more ranks than samples or shards)."""
    parsed = parse_spec(spec)
    if parsed.kind == "shards":
        from multimodal.data.pipeline import expand_urls

        urls = expand_urls(parsed.path)
        start, stop = split_range(len(urls), world_size, rank)
        return urls[start:stop] or None
    samples = open_samples(parsed)
    start, stop = split_range(len(samples), world_size, rank)
    return SliceSamples(samples, start, stop) if stop > start else None


def embed_part(
    loaded: LoadedModel, spec: str, captions: str | None, options: RunOptions, world: int, rank: int
) -> Embeddings | None:
    """The embeddings of `rank`'s part of the data (None when the part is empty)."""
    part = data_slice(spec, world, rank)
    if part is None:
        return None
    return embed_data(loaded, part, captions, options, f"{spec} (rank {rank})")


def merge(parts: list[Embeddings | None]) -> Embeddings:
    """The parts of the ranks in rank order as one dataset's embeddings (caption indices
    shifted to the merged images)."""
    found = [part for part in parts if part is not None]
    if not found:
        raise ValueError("the data yielded no images")
    skipped: Counter[str] = Counter()
    for part in found:
        skipped.update(part.skipped)
    merged = Embeddings(
        torch.cat([part.image_features for part in found]),
        torch.cat([part.labels for part in found]),
        [key for part in found for key in part.keys],
        skipped=dict(skipped),
        captions=found[0].captions,
    )
    if merged.captions is not None:
        offsets, total = [], 0
        for part in found:
            offsets.append(total)
            total += len(part.keys)
        merged.texts = [text for part in found for text in part.texts or []]
        merged.text_features = torch.cat([part.text_features for part in found])
        merged.text_image = torch.cat(
            [part.text_image + offset for part, offset in zip(found, offsets, strict=True)]
        )
    return merged


# --------------------------------------------------------------------------- processes


def rank_device(device: str, rank: int) -> str:
    """The device of a rank: GPU `rank` when the run is on CUDA, else `device`."""
    return f"cuda:{rank}" if torch.device(device).type == "cuda" else device


def _attempt(function: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", function(*args)
    except Exception as error:  # sent to rank 0, which raises it with the rank named
        return "error", f"{type(error).__name__}: {error}"


def _worker(rank: int, world: int, store: str, options: RunOptions) -> None:
    """Ranks 1..N-1: embed the parts rank 0 asks for until it says stop."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT
    )
    loaded: tuple[str, LoadedModel] | None = None
    quiet = RunOptions(**{**options.__dict__, "progress": False})
    try:
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0][0] == "stop":
                break
            _, model, spec, captions = message[0]
            if loaded is None or loaded[0] != model.fingerprint:
                loaded = None  # free the previous model first
                status = _attempt(model.load, rank_device(options.device, rank))
                if status[0] == "ok":
                    loaded = (model.fingerprint, status[1])
            if loaded is None:
                result = status
            else:
                result = _attempt(embed_part, loaded[1], spec, captions, quiet, world, rank)
            dist.gather_object(result, None, dst=0)
    finally:
        dist.destroy_process_group()


class EmbedPool:
    """Ranks 1..N-1 (spawned processes) and this process as rank 0 of a gloo group; `embed`
    embeds one dataset across all of them. Use as a context manager (the workers stop and
    the group is destroyed on exit)."""

    def __init__(self, world_size: int, options: RunOptions) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if world_size < 2:
            raise ValueError(f"world_size={world_size}: a pool needs at least 2 processes")
        if dist.is_initialized():
            raise ValueError(
                "--devices N: this process is already in a torch.distributed group; run "
                "`multimodal benchmark` as a plain process (it starts its own N processes)"
            )
        self.world_size = world_size
        self.options = options
        self._dir = tempfile.mkdtemp(prefix="benchmark-gloo-")
        store = os.path.join(self._dir, "store")
        context = mp.get_context("spawn")
        self.workers = [
            context.Process(target=_worker, args=(rank, world_size, store, options), daemon=True)
            for rank in range(1, world_size)
        ]
        for worker in self.workers:
            worker.start()
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=0, world_size=world_size, timeout=TIMEOUT
        )

    def embed(self, model: Any, loaded: LoadedModel, spec: str, captions: str | None) -> Embeddings:
        """Every rank's part of the data of `spec`, embedded by `model` (a `ModelSpec`;
        `loaded` is rank 0's copy), merged in rank order."""
        import torch.distributed as dist

        dist.broadcast_object_list([("embed", model, spec, captions)], src=0)
        own = _attempt(embed_part, loaded, spec, captions, self.options, self.world_size, 0)
        gathered: list[Any] = [None] * self.world_size
        dist.gather_object(own, gathered, dst=0)
        for rank, (status, value) in enumerate(gathered):
            if status == "error":
                raise ValueError(f"--devices {self.world_size}, rank {rank}: {value}")
        return merge([value for _, value in gathered])

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.broadcast_object_list([("stop",)], src=0)
            dist.destroy_process_group()
        for worker in self.workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.terminate()
        with contextlib.suppress(OSError):
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)

    def __enter__(self) -> EmbedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
