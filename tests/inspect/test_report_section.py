"""The attention section for evaluation reports: rollout overlays of the example images (and a
captioner's per-token maps) that `write_report` embeds."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from multimodal.eval.report import Report, write_report
from multimodal.inspect import display_image, image_attention, overlay, rollout_map
from multimodal.inspect.report_section import attention_section

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def test_clip_rollout_rows_are_the_overlays(loaded_clip, tmp_path):
    loaded = loaded_clip
    section = attention_section(loaded.model, PIXELS, loaded.mean, loaded.std, ["x", "y"])
    (_, table) = section.blocks
    assert table.columns == ["key", "image", "rollout"] and len(table.rows) == 2
    attention = image_attention(loaded.model.image_tower, PIXELS)
    maps = rollout_map(attention.attentions, attention.layout)
    for i, row in enumerate(table.rows):
        shown = display_image(PIXELS[i], loaded.mean, loaded.std, 96)
        expected = np.asarray(overlay(shown, maps[i]))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row[2].png))), expected)
    paths = write_report(Report("r", {"a": 1}, [section]), tmp_path)
    assert paths["html"].read_text().count("<img") >= 4


def test_captioner_rows_have_captions_and_token_maps(loaded_captioner):
    loaded = loaded_captioner
    section = attention_section(
        loaded.model, PIXELS, loaded.mean, loaded.std, ["x", "y"], tokenizer=loaded.tokenizer
    )
    _, images, words = section.blocks
    assert images.columns[-1] == "caption"
    assert len(words.rows) > 0 and {row[0] for row in words.rows} <= {"x", "y"}
