"""Tiny randomly initialised checkpoints of configs/clip/digits.yaml and
configs/caption/digits.yaml (32 wide, 2-layer image towers, 1-layer text stacks) saved with
their configs, and a few images on disk, for `multimodal attention` (no training, no shards)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from multimodal.data.demo import write_demo_tokenizer
from multimodal.eval.loading import instantiate_model_and_data, load_model
from tests.helpers import CONFIGS, save_task

TINY = {"dim": 32, "n_heads": 2}


def tiny_clip_config() -> dict:
    """configs/clip/digits.yaml with a 2-layer image tower and a 1-layer text tower, 32 wide."""
    config = yaml.safe_load((CONFIGS / "clip/digits.yaml").read_text())
    clip = config["model"]["init_args"]["model"]["init_args"]
    clip["embed_dim"] = 32
    clip["image_tower"]["init_args"]["config"].update(TINY, n_layers=2)
    clip["text_tower"]["init_args"]["config"]["transformer"].update(TINY, n_layers=1)
    return config


def tiny_caption_config(tokenizer: str) -> dict:
    """configs/caption/digits.yaml with a 2-layer image tower and a 1-layer decoder, 32 wide,
    reading the demo tokenizer at `tokenizer`."""
    config = yaml.safe_load((CONFIGS / "caption/digits.yaml").read_text())
    captioner = config["model"]["init_args"]["model"]["init_args"]
    captioner["image_tower"]["init_args"]["config"].update(TINY, n_layers=2)
    captioner["decoder"]["init_args"]["config"]["transformer"].update(TINY, n_layers=1)
    config["data"]["init_args"]["tokenizer"] = tokenizer
    return config


def _save(root, config: dict):
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    task, _ = instantiate_model_and_data(path)
    return save_task(task, root / "tiny.ckpt"), path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(checkpoint, config) of a randomly initialised tiny digits CLIP."""
    return _save(tmp_path_factory.mktemp("tiny_clip"), tiny_clip_config())


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory):
    """(checkpoint, config) of a randomly initialised tiny digits captioner."""
    root = tmp_path_factory.mktemp("tiny_captioner")
    write_demo_tokenizer(root)
    return _save(root, tiny_caption_config(str(root / "tokenizer")))


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Two noise PNGs in a folder and one JPEG beside it: (folder, jpeg)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    folder = root / "folder"
    folder.mkdir()
    for name in ("a.png", "b c.png"):  # a space: output file names are made safe
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    jpeg = root / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(jpeg)
    return folder, jpeg


@pytest.fixture(scope="session")
def loaded_clip(tiny_clip):
    """The tiny CLIP as the commands load it (`LoadedModel`, eval mode); read-only."""
    checkpoint, config = tiny_clip
    return load_model(checkpoint, config=config)


@pytest.fixture(scope="session")
def loaded_captioner(tiny_captioner):
    """The tiny captioner as the commands load it (`LoadedModel`, eval mode); read-only."""
    checkpoint, config = tiny_captioner
    return load_model(checkpoint, config=config)
