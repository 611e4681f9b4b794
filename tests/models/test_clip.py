"""CLIP model: projections, normalisation, temperature, locking; the contrastive task."""

from __future__ import annotations

import math

import pytest
import torch

from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.models.losses import clip_loss, siglip_loss
from multimodal.tasks import ContrastivePretraining
from tests.helpers import quiet_trainer
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig


def small_clip(**kwargs) -> CLIP:
    vit = ViT(ViTConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2))
    text = TextEncoder(
        TextConfig(
            vocab_size=40,
            transformer=TransformerConfig(
                dim=24, n_layers=1, n_heads=2, causal=True, position="learned", max_positions=8
            ),
        )
    )
    return CLIP(vit, text, embed_dim=16, **kwargs)


def batch(n: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 40, (n, 8))
    mask = torch.ones(n, 8, dtype=torch.bool)
    mask[:, 6:] = False
    return {"images": torch.randn(n, 3, 16, 16), "input_ids": ids, "attention_mask": mask}


def test_features_are_projected_normalised_and_scaled():
    model = small_clip()
    b = batch()
    out = model(b["images"], b["input_ids"], b["attention_mask"])
    assert out.image_features.shape == out.text_features.shape == (6, 16)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(6))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5) and out.logit_bias is None
    raw = model.encode_image(b["images"], normalize=False)
    expected = model.image_projection(model.image_tower(b["images"]).pooled)
    torch.testing.assert_close(raw, expected)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(100.0)  # clamped at max_logit_scale


def test_locked_towers_do_not_train_but_projections_do():
    model = small_clip()
    model.lock_image_tower()
    model.lock_text_tower()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_projection", "text_projection", "logit_scale"}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_contrastive_task_trains_and_uses_the_loss(loss):
    model = small_clip(init_logit_bias=-10.0 if loss == "siglip" else None)
    task = ContrastivePretraining(model, loss=loss)
    b = batch()
    out = task(b)
    reference = (
        siglip_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
        if loss == "siglip"
        else clip_loss(out.image_features, out.text_features, out.logit_scale)
    )
    torch.testing.assert_close(task.loss(out), reference)
    loader = torch.utils.data.DataLoader([b] * 4, batch_size=None)
    run = quiet_trainer(max_steps=3)
    run.fit(task, loader)
    assert torch.isfinite(run.callback_metrics["train/loss"])
    assert "train/logit_scale" in run.callback_metrics


def test_siglip_without_bias_is_refused():
    with pytest.raises(ValueError, match="init_logit_bias"):
        ContrastivePretraining(small_clip(), loss="siglip")
