"""CLIP trained on the digits demo shards classifies held-out digits zero-shot with prompt
templates it never saw in training."""

from __future__ import annotations

import time

import pytest
import torch

from multimodal.data import ImageTextDataModule
from multimodal.data.demo import (
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    render_captions,
    write_demo_shards,
)
from multimodal.eval.zeroshot import zeroshot_classifier, zeroshot_logits
from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.tasks import ContrastivePretraining, OptimConfig
from tests.helpers import quiet_trainer
from text import TextConfig, TextEncoder, load_tokenizer
from vision import ImageTransformConfig, ViT, ViTConfig

EPOCHS = 40  # 134 s on 2 cores: 95% zero-shot top-1 (20 epochs: 73%)


@pytest.mark.slow
def test_clip_reaches_90_percent_zero_shot_on_held_out_digits(tmp_path):
    torch.manual_seed(0)
    write_demo_shards(tmp_path, progress=False)
    transform = ImageTransformConfig(
        image_size=32, normalization="openai_clip", hflip=0.0, train_scale=(0.8, 1.0), crop_pct=1.0
    )
    data = ImageTextDataModule(
        str(tmp_path / "train"),
        str(tmp_path / "test"),
        context_length=16,
        batch_size=128,
        num_workers=2,
        transform=transform,
    )
    image_tower = ViT(
        ViTConfig(
            image_size=32,
            patch_size=4,
            dim=128,
            n_layers=4,
            n_heads=4,
            pool="avg",
            class_token=False,
        )
    )
    text_tower = TextEncoder(
        TextConfig(
            vocab_size=49408,
            transformer=TransformerConfig(
                dim=128, n_layers=3, n_heads=4, causal=True, position="learned", max_positions=16
            ),
        )
    )
    model = CLIP(image_tower, text_tower, embed_dim=128)
    optim = OptimConfig(lr=5e-4, betas=(0.9, 0.98), weight_decay=0.1, warmup_steps=50)
    task = ContrastivePretraining(model, optim=optim)
    start = time.perf_counter()
    quiet_trainer(max_epochs=EPOCHS, precision="bf16-mixed", limit_val_batches=0).fit(task, data)
    elapsed = time.perf_counter() - start

    tokenizer = load_tokenizer("clip")
    model.eval()
    held_out = zeroshot_classifier(
        model,
        tokenizer,
        [render_captions(c, HELD_OUT_TEMPLATES) for c in range(10)],
        context_length=16,
    )
    assert not set(HELD_OUT_TEMPLATES) & set(TRAIN_TEMPLATES)
    correct = total = 0
    with torch.no_grad():
        for batch in data.val_dataloader():  # the test split: images never trained on
            logits = zeroshot_logits(model.encode_image(batch["images"]), held_out)
            correct += (logits.argmax(1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    assert total == 270
    assert correct / total >= 0.9, f"zero-shot top-1 {correct}/{total} after {elapsed:.0f} s"
    assert elapsed < 180, f"training took {elapsed:.0f} s"
