"""Image transforms against torchvision built by hand, and the normalisation constants."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vision import ImageTransformConfig


def random_image(width=50, height=40) -> Image.Image:
    return Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    )


def test_eval_transform_is_resize_then_center_crop():
    config = ImageTransformConfig(image_size=32, crop_pct=0.875, normalization="openai_clip")
    reference = T.Compose(
        [
            T.Resize(int(32 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            T.ToTensor(),
            T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
        ]
    )
    image = random_image()
    torch.testing.assert_close(config.eval()(image), reference(image))


def test_normalisation_constants():
    clip = ImageTransformConfig(normalization="openai_clip")
    assert clip.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert clip.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    imagenet = ImageTransformConfig(normalization="imagenet")
    assert imagenet.mean == pytest.approx((0.485, 0.456, 0.406))
    assert imagenet.std == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("randaugment", [None, "rand-m9-mstd0.5"])
def test_train_transform_crops_to_size_and_normalises(randaugment):
    config = ImageTransformConfig(image_size=24, hflip=1.0, randaugment=randaugment)
    white = Image.new("RGB", (50, 40), (255, 255, 255))
    out = config.train()(white)
    assert out.shape == (3, 24, 24)
    if randaugment is None:  # any crop or flip of a white image is white
        expected = (1 - torch.tensor(config.mean)) / torch.tensor(config.std)
        torch.testing.assert_close(out, expected[:, None, None].expand(3, 24, 24))
    else:
        assert any("RandAugment" in type(t).__name__ for t in config.train().transforms)


def test_flip_probability_is_honoured():
    image = random_image(24, 24)
    config = ImageTransformConfig(image_size=24, hflip=1.0, train_scale=(1.0, 1.0))
    flipped = config.train()(image)
    plain = ImageTransformConfig(image_size=24, hflip=0.0, train_scale=(1.0, 1.0)).train()(image)
    # a full-area crop of a square image is the image itself
    torch.testing.assert_close(flipped, plain.flip(-1))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"normalization": "cifar"}, "normalization"),
        ({"train_scale": (0.5, 0.2)}, "train_scale"),
        ({"hflip": 2.0}, "hflip"),
        ({"randaugment": "auto"}, "randaugment"),
        ({"crop_pct": 0.0}, "crop_pct"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_bad_transform_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ImageTransformConfig.{field}"):
        ImageTransformConfig(**kwargs)
