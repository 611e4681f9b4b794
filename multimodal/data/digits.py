"""The bundled demo data: scikit-learn's 1,797 handwritten digit scans (8x8, shipped inside the
package, no download), rendered as RGB images, with a deterministic train/val/test split."""

from __future__ import annotations

import logging

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from multimodal.data.predict_inputs import ImageFolderDataset, image_key_collate, rank_loader
from vision.transforms import ImageTransformConfig

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test")


def load_digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All digits as (N, size, size, 3) uint8 images, dark ink on white, and their labels."""
    from sklearn.datasets import load_digits  # heavy import, only when the data is needed

    if size < 8:
        raise ValueError(f"size={size} must be >= 8 (the scans are 8x8)")
    digits = load_digits()
    scans = (255 - digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    images = np.stack(
        [
            np.asarray(Image.fromarray(s).resize((size, size), Image.Resampling.BILINEAR))
            for s in scans
        ]
    )
    return np.repeat(images[..., None], 3, axis=-1), digits.target.astype(np.int64)


def split_indices(
    n: int, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic split of range(n): the same seed gives the same indices on every machine."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and "
            "leave some data for training"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {
        "val": np.sort(order[:n_val]),
        "test": np.sort(order[n_val : n_val + n_test]),
        "train": np.sort(order[n_val + n_test :]),
    }


class ImageArrayDataset(Dataset):
    """(image, label) pairs from in-memory uint8 arrays, transformed as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def default_digit_transform() -> ImageTransformConfig:
    # no flips (a mirrored digit is another glyph), mild crops, the whole image at eval time
    return ImageTransformConfig(image_size=32, hflip=0.0, train_scale=(0.7, 1.0), crop_pct=1.0)


class DigitsDataModule(LightningDataModule):
    """Image classification on the bundled digits, held in memory.

    Args:
        transform: image transforms (default: 32 px, no flips, mild crops, ImageNet stats).
        batch_size: images per batch and device.
        num_workers: DataLoader worker processes.
        render_size: side of the rendered images before the transforms.
        val_fraction, test_fraction, seed: the deterministic split.
        predict_images: a folder of images `multimodal predict` classifies (every image file
            under it, sorted by relative path, which is the key; default: the test split,
            keys `test/<n>`); batches are dicts of `images` and `keys`.
    """

    num_classes = len(DIGIT_NAMES)
    class_names = DIGIT_NAMES

    def __init__(
        self,
        transform: ImageTransformConfig | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        render_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        predict_images: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be > 0")
        self.transform = transform or default_digit_transform()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.render_size = render_size
        self.fractions = (val_fraction, test_fraction)
        self.seed = seed
        self.predict_images = predict_images
        self.datasets: dict[str, ImageArrayDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        images, labels = load_digit_images(self.render_size)
        splits = split_indices(len(labels), *self.fractions, seed=self.seed)
        for name, index in splits.items():
            transform = self.transform.train() if name == "train" else self.transform.eval()
            self.datasets[name] = ImageArrayDataset(images[index], labels[index], transform)
        log.info("digits: %s", {name: len(d) for name, d in self.datasets.items()})

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=split == "train",
            drop_last=split == "train" and len(self.datasets[split]) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """`predict_images`, else the test split; this rank's contiguous run of it (every
        image once over all ranks, in order)."""
        if self.predict_images is not None:
            dataset = ImageFolderDataset(self.predict_images, self.transform.eval())
        else:
            self.setup("predict")
            dataset = KeyedImages(self.datasets["test"], "test")
        return rank_loader(
            dataset,
            batch_size=self.batch_size,
            collate=image_key_collate,
            trainer=self.trainer,
            num_workers=self.num_workers,
        )


class KeyedImages(Dataset):
    """The images of an `ImageArrayDataset` as `{"image", "key": "<name>/<index>"}`."""

    def __init__(self, dataset: ImageArrayDataset, name: str) -> None:
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.dataset[index][0], "key": f"{self.name}/{index}"}
