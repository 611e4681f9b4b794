"""What `multimodal predict` reads besides shards: an image folder (every image file, sorted by
relative path, key = that path) and in-memory prompts (one a line of a text file, key = the
line number), split over the ranks in contiguous balanced runs.

Each rank reads the run `multimodal.data.stream_plan.balanced` gives it (the evaluation split
of the shard streams: sizes differ by at most one, nothing padded, every item exactly once), so
concatenating the ranks' outputs in rank order gives the order of a one-process run; the
prediction writer (`multimodal.export.predict`) merges them that way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from multimodal.data.stream_plan import balanced

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_images(root: str | Path) -> list[str]:
    """The image files under `root` (recursively, by suffix), as sorted relative POSIX paths;
    a missing folder or one without images raises ValueError naming it."""
    folder = Path(root)
    if not folder.is_dir():
        raise ValueError(f"predict_images={str(root)!r} is not a folder of images")
    found = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not found:
        raise ValueError(
            f"predict_images={str(root)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    return found


class ImageFolderDataset(Dataset):
    """`{"image": transform(RGB image), "key": relative path}` of every image under `root`."""

    def __init__(self, root: str | Path, transform: Callable) -> None:
        self.root = Path(root)
        self.keys = list_images(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        try:
            with Image.open(self.root / key) as image:
                rgb = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {str(self.root / key)!r}: {error}") from error
        return {"image": self.transform(rgb), "key": key}


def image_key_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"image", "key"}` items -> `{"images": (B, 3, H, W), "keys": [B str]}`."""
    return {
        "images": default_collate([i["image"] for i in items]),  # (B, 3, H, W)
        "keys": [i["key"] for i in items],
    }


class RankRangeSampler(DistributedSampler):
    """This rank's contiguous balanced run of `range(n)` (`stream_plan.balanced`): every
    index once over the ranks, none padded, in order.

    A `DistributedSampler` so that Lightning, which replaces any other sampler under DDP
    (with a strided one when predicting), keeps it."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=False)
        self.start, self.stop = balanced(n, world_size, rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class Unwrapped:
    """An iterable that hands out a loader's batches without being a DataLoader: Lightning
    rebuilds every DataLoader it predicts from (to record batch indices), which a
    `ShardLoader` (batches made in its pipeline, epochs and skip counts kept by the loader)
    does not survive; the writer needs no batch indices (rows carry their keys)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def trainer_rank(trainer: Trainer | None) -> tuple[int, int]:
    """(rank, world size) of the data-parallel ranks: the Trainer's, else torch.distributed's,
    else one rank."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_loader(
    dataset: Sequence,
    *,
    batch_size: int,
    collate: Callable,
    trainer: Trainer | None,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over this rank's contiguous run of `dataset`, in order."""
    rank, world_size = trainer_rank(trainer)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RankRangeSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        collate_fn=collate,
    )
