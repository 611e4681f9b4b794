"""Webdataset shard writing and reading, datamodules and the bundled demo dataset."""

from multimodal.data.digits import DIGIT_NAMES, DigitsDataModule, load_digit_images, split_indices

__all__ = ["DIGIT_NAMES", "DigitsDataModule", "load_digit_images", "split_indices"]
