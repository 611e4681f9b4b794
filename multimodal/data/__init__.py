"""Webdataset shard writing and reading, datamodules and the bundled demo dataset."""

from multimodal.data.digits import DIGIT_NAMES, DigitsDataModule, load_digit_images, split_indices
from multimodal.data.text import (
    SyntheticSequenceDataModule,
    TextCollator,
    TextFileDataModule,
    TextPairFileDataModule,
    pad_sequences,
)

__all__ = [
    "DIGIT_NAMES",
    "DigitsDataModule",
    "SyntheticSequenceDataModule",
    "TextCollator",
    "TextFileDataModule",
    "TextPairFileDataModule",
    "load_digit_images",
    "pad_sequences",
    "split_indices",
]
