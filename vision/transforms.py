"""Image transforms for training (random resized crop, flip, optional RandAugment) and
evaluation (resize + center crop), built by timm's `create_transform`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from timm.data import create_transform
from timm.data.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

# name -> (mean, std) per RGB channel
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "openai_clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
}
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass
class ImageTransformConfig:
    """How images become tensors; validated on creation.

    `normalization`: "imagenet" (classification), "openai_clip" (CLIP towers) or "inception"
    (mean = std = 0.5). Training: a random crop of `train_scale` of the area (aspect
    3/4..4/3) resized to `image_size`, horizontal flip with probability `hflip` (0 for
    digits and text, where a mirror changes the meaning), `randaugment` as a timm string
    such as "rand-m9-mstd0.5". Evaluation: resize the short side to image_size / crop_pct,
    then center crop.
    """

    image_size: int = 224
    normalization: str = "imagenet"
    train_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    randaugment: str | None = None
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        prefix = "ImageTransformConfig."
        if self.image_size <= 0:
            raise ValueError(f"{prefix}image_size={self.image_size} must be > 0")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"{prefix}normalization={self.normalization!r} must be one of "
                f"{sorted(NORMALIZATIONS)}"
            )
        low, high = self.train_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"{prefix}train_scale={self.train_scale} must satisfy 0 < low <= high <= 1"
            )
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"{prefix}hflip={self.hflip} must be a probability")
        if self.randaugment is not None and not self.randaugment.startswith("rand"):
            raise ValueError(
                f"{prefix}randaugment={self.randaugment!r} must be a timm RandAugment string "
                "such as 'rand-m9-mstd0.5'"
            )
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"{prefix}crop_pct={self.crop_pct} must be in (0, 1]")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"{prefix}interpolation={self.interpolation!r} must be one of "
                f"{list(INTERPOLATIONS)}"
            )

    @property
    def mean(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple[float, ...]:
        return NORMALIZATIONS[self.normalization][1]

    def train(self) -> Callable:
        """PIL image -> augmented, normalised (3, image_size, image_size) tensor."""
        return create_transform(
            self.image_size,
            is_training=True,
            scale=tuple(self.train_scale),
            hflip=self.hflip,
            color_jitter=None,
            auto_augment=self.randaugment,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )

    def eval(self) -> Callable:
        """PIL image -> resized, center-cropped, normalised (3, image_size, image_size) tensor."""
        return create_transform(
            self.image_size,
            is_training=False,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )
