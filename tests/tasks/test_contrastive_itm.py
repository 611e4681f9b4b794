"""ContrastivePretraining with an image-text matching head: the ITM loss over matches and
hard negatives trains next to the CLIP loss, and reaches the head's parameters."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from multimodal.layers import TransformerConfig
from multimodal.models import CLIP, ITMHead
from multimodal.tasks import ContrastivePretraining
from tests.helpers import quiet_trainer
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig


def batches(n: int = 3, size: int = 6) -> list[dict[str, torch.Tensor]]:
    mask = torch.ones(size, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return [
        {
            "images": torch.randn(size, 3, 16, 16),
            "input_ids": torch.randint(1, 30, (size, 5)),
            "attention_mask": mask,
        }
        for _ in range(n)
    ]


def test_itm_head_trains_next_to_the_clip_loss():
    image = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, n_layers=1, n_heads=2))
    text = TextEncoder(
        TextConfig(
            vocab_size=30,
            transformer=TransformerConfig(dim=24, n_layers=1, n_heads=2, max_positions=8),
        )
    )
    head = ITMHead(image_dim=32, text_dim=24, config=TransformerConfig(dim=16, n_heads=2))
    task = ContrastivePretraining(CLIP(image, text, embed_dim=16), itm_head=head, itm_weight=0.5)
    before = [p.detach().clone() for p in head.parameters()]
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(task, DataLoader(batches(), batch_size=None))
    metrics = trainer.callback_metrics
    assert {"train/itm_loss", "train/itm_acc", "train/loss"} <= set(metrics)
    # 6 matches + 12 hard negatives: the loss is a 2-way cross-entropy near ln 2 at the start
    assert 0.2 < float(metrics["train/itm_loss"]) < 1.5
    assert all(not p.detach().equal(b) for p, b in zip(head.parameters(), before, strict=True))
