"""Webdataset shard writing and reading, datamodules and the bundled demo dataset."""

from multimodal.data.digits import DIGIT_NAMES, DigitsDataModule, load_digit_images, split_indices
from multimodal.data.pipeline import (
    ShardLoader,
    ShardPipeline,
    ShardPipelineConfig,
    SkipCounter,
    SkipSample,
    Source,
    build_pipeline,
    decode_sample,
    expand_urls,
)
from multimodal.data.shards_datamodules import (
    ImageTextDataModule,
    ShardClassificationDataModule,
    SkippedSamplesLogger,
    VQADataModule,
    clip_image_transform,
)
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
    "ImageTextDataModule",
    "ShardClassificationDataModule",
    "ShardLoader",
    "ShardPipeline",
    "ShardPipelineConfig",
    "SkipCounter",
    "SkipSample",
    "SkippedSamplesLogger",
    "Source",
    "SyntheticSequenceDataModule",
    "TextCollator",
    "TextFileDataModule",
    "TextPairFileDataModule",
    "VQADataModule",
    "build_pipeline",
    "clip_image_transform",
    "decode_sample",
    "expand_urls",
    "load_digit_images",
    "pad_sequences",
    "split_indices",
]
