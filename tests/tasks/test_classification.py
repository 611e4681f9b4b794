"""ImageClassifier: learns, logs accuracy, runs mixup/cutmix and any tower."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from multimodal.data import load_digit_images
from multimodal.tasks import ImageClassifier, OptimConfig
from tests.helpers import quiet_trainer
from vision import TimmEncoder, ViT, ViTConfig


def digit_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digit_images(16)
    x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(labels[:n])


trainer = quiet_trainer


def small_vit() -> ViT:
    return ViT(
        ViTConfig(
            image_size=16,
            patch_size=4,
            dim=64,
            n_layers=2,
            n_heads=4,
            pool="avg",
            class_token=False,
        )
    )


class StopAtPerfectAccuracy(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.callback_metrics["train/acc1_step"] == 1.0:
            trainer.should_stop = True


def test_overfits_a_64_image_batch_in_under_100_steps():
    images, labels = digit_batch(64)
    task = ImageClassifier(
        small_vit(), 10, label_smoothing=0.0, optim=OptimConfig(lr=3e-3, weight_decay=0.0)
    )
    loader = DataLoader(TensorDataset(images, labels), batch_size=64)
    run = trainer(max_steps=99, callbacks=[StopAtPerfectAccuracy()])
    run.fit(task, loader)
    with torch.no_grad():
        accuracy = (task.eval()(images).argmax(-1) == labels).float().mean().item()
    assert accuracy == 1.0, f"training accuracy {accuracy:.3f} after {run.global_step} steps"
    assert run.global_step < 100


def test_validation_logs_top1_and_top5():
    images, labels = digit_batch(32)
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    task = ImageClassifier(small_vit(), 10)
    run = trainer(max_steps=2, limit_val_batches=2)
    run.fit(task, loader, loader)
    metrics = run.callback_metrics
    assert {"train/loss", "val/loss", "val/acc1", "val/acc5"} <= set(metrics)
    assert 0 <= metrics["val/acc1"] <= metrics["val/acc5"] <= 1


def test_mixup_and_cutmix_train():
    images, labels = digit_batch(32)
    task = ImageClassifier(small_vit(), 10, mixup_alpha=0.8, cutmix_alpha=1.0)
    run = trainer(max_steps=2)
    run.fit(task, DataLoader(TensorDataset(images, labels), batch_size=16))
    assert torch.isfinite(run.callback_metrics["train/loss"])


def test_timm_tower_trains_under_bf16():
    images, labels = digit_batch(16)
    images = torch.nn.functional.interpolate(images, size=32)
    task = ImageClassifier(TimmEncoder("resnet18"), 10)
    run = trainer(max_steps=2, precision="bf16-mixed")
    run.fit(task, DataLoader(TensorDataset(images, labels), batch_size=8))
    assert torch.isfinite(run.callback_metrics["train/loss"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassifier(small_vit(), 10, label_smoothing=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        ImageClassifier(small_vit(), 1)
