"""Images/s through the whole shard pipeline (tar reading, shuffle, decode, resize/crop to 224,
CLIP normalisation, tokenization, batching, transfer from the workers) with 2 workers, against
(1) plain webdataset reading the same shards with the same transforms and tokenizer in a
DataLoader with the same workers (the cost of the planned, resumable stream: per-sample seeding,
cursors, index skipping), and (2) a plain single-process loop doing the same decode +
transforms + tokenization + stacking over the same images held in memory; all measured in the
same run, alternated. Also the size of the checkpointed loader state with a small and a large
shuffle buffer (it must not grow with the buffer's content) and the time a resumed loader takes
to its first batch halfway through an epoch. Never a timed test.

    python bench/loader.py [--images 2000] [--workers 2] [--batch 64] [--repeats 3]

The ratio compares throughput per core: (pipeline images/s / workers) / (loop images/s / 1);
the loop runs with one torch thread, so it uses one core. That wall-clock ratio assumes the
workers really get a core each; on a shared machine they may not, so the ratio of images per
CPU-second (user + system time of every process involved: main process and workers) is
printed as well. Medians of the runs; the pipeline's workers are persistent and started
before the measured epochs.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from multimodal.data import ImageTextDataModule, ShardLoader, clip_image_transform
from text.tokenizer import load_tokenizer

SHARD_SIZE = 250


def make_jpeg(rng: np.random.Generator) -> bytes:
    """A 256-320 px JPEG of gradients and noise (compresses like a photo, unlike flat colour)."""
    height, width = (int(v) for v in rng.integers(256, 321, size=2))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [
        127 + 100 * np.sin(x / rng.uniform(20, 80) + y / rng.uniform(20, 80) + p) for p in phase
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 20, size=(height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shards(folder: Path, n_images: int) -> list[tuple[bytes, str]]:
    """Shards of SHARD_SIZE samples in `folder`; returns the (jpeg, caption) pairs."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "striped", "wavy", "pattern", "photo", "of", "a", "bright", "dark"]
    pairs = []
    for start in range(0, n_images, SHARD_SIZE):
        with wds.TarWriter(str(folder / f"bench-{start // SHARD_SIZE:06d}.tar")) as writer:
            for n in range(start, min(start + SHARD_SIZE, n_images)):
                jpeg = make_jpeg(rng)
                caption = " ".join(random.Random(n).choices(words, k=12))
                writer.write({"__key__": f"{n:06d}", "jpg": jpeg, "txt": caption})
                pairs.append((jpeg, caption))
    return pairs


@dataclass
class Rate:
    """One measurement: images, wall-clock seconds and CPU seconds (all processes involved)."""

    images: int
    wall: float
    cpu: float

    @property
    def per_second(self) -> float:
        return self.images / self.wall

    @property
    def per_cpu_second(self) -> float:
        return self.images / self.cpu


def cpu_seconds() -> float:
    """User + system time of this process and of its live children (the DataLoader workers),
    from /proc (Linux)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for child in multiprocessing.active_children():
        try:
            stat = Path(f"/proc/{child.pid}/stat").read_text()
        except FileNotFoundError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) "
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def measure_loop(pairs: list[tuple[bytes, str]], batch_size: int) -> Rate:
    """The plain loop: decode, transform, tokenize, stack; one process, one torch thread."""
    transform = clip_image_transform(224).train()
    tokenizer = load_tokenizer("clip")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wall, cpu = time.perf_counter(), cpu_seconds()
        images, texts = [], []
        for jpeg, caption in pairs:
            with Image.open(io.BytesIO(jpeg)) as image:
                images.append(transform(image.convert("RGB")))
            texts.append(caption)
            if len(images) == batch_size:
                torch.stack(images)
                tokenizer.batch_encode(texts, max_length=77, padding="max_length")
                images, texts = [], []
        return Rate(len(pairs), time.perf_counter() - wall, cpu_seconds() - cpu)
    finally:
        torch.set_num_threads(threads)


class TransformCaption:
    """(jpeg image, caption) -> (tensor, token ids), as the datamodule's map does; picklable."""

    def __init__(self) -> None:
        self.transform = clip_image_transform(224).train()
        self.tokenizer = load_tokenizer("clip")

    def __call__(self, sample: tuple) -> tuple:
        image, caption = sample
        return self.transform(image.convert("RGB")), self.tokenizer.encode(caption, max_length=77)


def collate_pairs(samples: list) -> dict:
    return {"images": torch.stack([s[0] for s in samples]), "ids": [s[1] for s in samples]}


def plain_webdataset(folder: Path, batch: int, workers: int) -> torch.utils.data.DataLoader:
    """webdataset's own pipeline over the same shards: shard shuffle, split by worker, 500-sample
    shuffle buffer, PIL decode, the same transform and tokenizer, batching in the workers."""
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    dataset = (
        wds.WebDataset(
            urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False
        )
        .shuffle(500)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map(TransformCaption())
        .batched(batch, collation_fn=collate_pairs)
    )
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, persistent_workers=True
    )


def measure_pipeline(loader: ShardLoader) -> Rate:
    """One epoch of a training loader whose workers are already running (persistent)."""
    wall, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for batch in loader:
        count += batch["images"].shape[0]
        assert batch["images"].shape[1:] == (3, 224, 224)
    return Rate(count, time.perf_counter() - wall, cpu_seconds() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        pairs = write_shards(folder, args.images)
        megabytes = sum(len(jpeg) for jpeg, _ in pairs) / 2**20
        print(
            f"wrote {args.images} JPEGs (256-320 px, {megabytes:.1f} MiB) in "
            f"{len(list(folder.glob('*.tar')))} shards in {time.perf_counter() - start:.1f} s"
        )
        data = ImageTextDataModule(
            str(folder),
            batch_size=args.batch,
            num_workers=args.workers,
            persistent_workers=True,
            shuffle_buffer=500,
        )
        data.setup("fit")
        loader = data.train_dataloader()
        plain = plain_webdataset(folder, args.batch, args.workers)
        measure_pipeline(loader)  # warm-up: starts the workers
        measure_pipeline(plain)
        loop, pipe, web = [], [], []
        for _ in range(args.repeats):  # alternated so that drifts in machine load hit both
            loop.append(measure_loop(pairs, args.batch))
            pipe.append(measure_pipeline(loader))
            web.append(measure_pipeline(plain))
        states = {}
        for buffer in (500, 5000):
            sized = ImageTextDataModule(
                str(folder), batch_size=args.batch, num_workers=args.workers, shuffle_buffer=buffer
            )
            sized_loader = sized.train_dataloader()
            stream = iter(sized_loader)
            half = len(sized_loader) // 2
            for _ in range(half):
                next(stream)
            states[buffer] = sized_loader.state_dict()
            del stream
        resumed = ImageTextDataModule(
            str(folder), batch_size=args.batch, num_workers=args.workers, shuffle_buffer=5000
        ).train_dataloader()
        resumed.load_state_dict(states[5000])
        start = time.perf_counter()
        next(iter(resumed))
        resume_seconds = time.perf_counter() - start
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    loop_rate = statistics.median(r.per_second for r in loop)
    pipe_rate = statistics.median(r.per_second for r in pipe)
    loop_cpu = statistics.median(r.per_cpu_second for r in loop)
    pipe_cpu = statistics.median(r.per_cpu_second for r in pipe)
    print(
        f"plain loop, 1 process, 1 thread: {loop_rate:7.1f} images/s "
        f"(runs: {fmt(r.per_second for r in loop)}), {loop_cpu:.1f} images per CPU-second"
    )
    print(
        f"pipeline, {args.workers} workers:          {pipe_rate:7.1f} images/s "
        f"(runs: {fmt(r.per_second for r in pipe)}), {pipe_cpu:.1f} images per CPU-second"
    )
    ratio = (pipe_rate / args.workers) / loop_rate
    print(
        f"per-core throughput ratio, wall clock (pipeline / {args.workers} cores vs loop / 1 "
        f"core): {ratio:.2f}"
    )
    print(f"per-core throughput ratio, CPU time (images per CPU-second): {pipe_cpu / loop_cpu:.2f}")
    web_rate = statistics.median(r.per_second for r in web)
    print(
        f"plain webdataset, {args.workers} workers:  {web_rate:7.1f} images/s "
        f"(runs: {fmt(r.per_second for r in web)})"
    )
    print(f"planned resumable stream / plain webdataset, images/s: {pipe_rate / web_rate:.3f}")
    for buffer, state in states.items():
        size = len(json.dumps(state).encode())
        print(f"loader state halfway through an epoch, shuffle buffer {buffer}: {size} bytes")
    print(f"a resumed loader's first batch halfway through the epoch: {resume_seconds:.2f} s")


def fmt(rates: Iterable[float]) -> str:
    return ", ".join(f"{r:.1f}" for r in rates)


if __name__ == "__main__":
    main()
