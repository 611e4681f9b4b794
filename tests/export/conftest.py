"""A tiny CLIP of configs/clip/digits.yaml saved as a checkpoint with its config, and a small
labelled shard, for the export and quantize commands (no training, no demo shards)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from multimodal.data.shards import encode_png, write_shards
from multimodal.eval.class_names import class_names
from multimodal.eval.loading import instantiate_model_and_data
from tests.helpers import CONFIGS, save_task

TINY = {"dim": 32, "n_heads": 2}


def tiny_digits_config() -> dict:
    """configs/clip/digits.yaml with 1-layer, 32-wide towers."""
    config = yaml.safe_load((CONFIGS / "clip/digits.yaml").read_text())
    clip = config["model"]["init_args"]["model"]["init_args"]
    clip["embed_dim"] = 32
    clip["image_tower"]["init_args"]["config"].update(TINY, n_layers=1)
    clip["text_tower"]["init_args"]["config"]["transformer"].update(TINY, n_layers=1)
    return config


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(checkpoint, config) of a randomly initialised tiny digits CLIP."""
    root = tmp_path_factory.mktemp("tiny_clip")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_digits_config()))
    task, _ = instantiate_model_and_data(config)
    return save_task(task, root / "tiny.ckpt"), config


@pytest.fixture(scope="session")
def few_digits(tmp_path_factory):
    """A shard of 40 labelled noise images named as the digits (label, class_name)."""
    root = tmp_path_factory.mktemp("few_digits")
    rng = np.random.default_rng(0)
    names = class_names("digits")
    samples = (
        {
            "__key__": f"noise-{i:04d}",
            "png": encode_png(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))),
            "txt": f"a photo of the number {names[i % 10]}",
            "json": {"label": i % 10, "class_name": names[i % 10], "split": "test"},
        }
        for i in range(40)
    )
    write_shards(samples, root, prefix="noise", progress=False)
    return root / "test"
