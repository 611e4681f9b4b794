"""Tower locking (LiT) with the last N blocks left trainable: the same meaning for our `CLIP`
and `OpenCLIP` (projections always train), and the `ContrastivePretraining` options."""

from __future__ import annotations

import json
import uuid

import open_clip
import pytest

from multimodal.models import CLIP, ClipLike, OpenCLIP
from multimodal.tasks import ContrastivePretraining
from tests.models.test_clip import small_clip
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "head_width": 16, "layers": 3},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def two_block_clip() -> CLIP:
    vit = ViT(ViTConfig(image_size=16, patch_size=8, dim=32, n_layers=2, n_heads=2, pool="attn"))
    text = small_clip().text_tower
    assert isinstance(text, TextEncoder) and isinstance(text.config, TextConfig)
    return CLIP(vit, text, embed_dim=16)


def test_our_clip_keeps_the_last_blocks_and_what_follows_them_trainable():
    model = two_block_clip()
    model.lock_image_tower(unlocked_layers=1)
    image = {n.removeprefix("image_tower.") for n in trainable(model) if "image_tower." in n}
    expected = {
        n
        for n, _ in model.image_tower.named_parameters()
        if n.startswith(("encoder.blocks.1.", "encoder.norm.", "attn_pool.", "fc_norm."))
    }
    assert image == expected and expected
    assert "image_projection.weight" in trainable(model)
    model.lock_text_tower()
    assert not any(n.startswith("text_tower.") for n in trainable(model))
    assert isinstance(model, ClipLike)
    with pytest.raises(ValueError, match="exceeds the 2 blocks"):
        model.lock_image_tower(unlocked_layers=3)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> OpenCLIP:
    name = f"test-tiny-lock-{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{name}.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return OpenCLIP(name)


def test_open_clip_locks_with_the_same_meaning(tiny_open_clip):
    model = tiny_open_clip
    model.requires_grad_(True)
    model.lock_image_tower(unlocked_layers=1)
    model.lock_text_tower(unlocked_layers=0)
    visual = {n.removeprefix("model.visual.") for n in trainable(model) if ".visual." in n}
    assert visual == {
        n
        for n, _ in model.model.visual.named_parameters()
        if n.startswith(("transformer.resblocks.2.", "ln_post.")) or n == "proj"
    }
    text = trainable(model) - {f"model.visual.{n}" for n in visual}
    assert text == {"model.text_projection", "model.logit_scale"}
    with pytest.raises(ValueError, match="exceeds the 3 blocks"):
        model.lock_text_tower(unlocked_layers=4)


def test_task_options_lock_the_towers_and_check_their_pairing():
    task = ContrastivePretraining(two_block_clip(), lock_image_tower=True)
    assert not any(n.startswith("model.image_tower.") for n in trainable(task))
    assert any(n.startswith("model.text_tower.") for n in trainable(task))
    with pytest.raises(ValueError, match="lock_text_unlocked_layers=1 needs lock_text_tower=true"):
        ContrastivePretraining(two_block_clip(), lock_text_unlocked_layers=1)
