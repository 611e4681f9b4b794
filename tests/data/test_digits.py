"""The bundled digits: rendering, the deterministic split and the datamodule."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from multimodal.data import DigitsDataModule, load_digit_images, split_indices


def test_images_are_the_scans_rendered_as_rgb():
    images, labels = load_digit_images(8)
    digits = load_digits()
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, digits.target)
    # at native size: dark ink on white, 0..16 mapped to 255..0
    expected = np.clip(255 - digits.images * (255 / 16), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images[..., 0], expected)
    assert (images[..., 0] == images[..., 2]).all()


def test_split_is_deterministic_disjoint_and_complete():
    a, b = split_indices(1797, 0.15, 0.15, seed=0), split_indices(1797, 0.15, 0.15, seed=0)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    everything = np.concatenate(list(a.values()))
    assert sorted(everything.tolist()) == list(range(1797))
    assert len(a["val"]) == len(a["test"]) == 270
    assert not np.array_equal(split_indices(1797, seed=1)["val"], a["val"])
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 0.6, 0.5)


def test_datamodule_batches():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 32, 32) and labels.shape == (32,)
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) + len(dm.datasets["test"]) == 1797
    val_images, _ = next(iter(dm.val_dataloader()))
    again, _ = next(iter(dm.val_dataloader()))
    np.testing.assert_array_equal(val_images.numpy(), again.numpy())  # no randomness at eval
