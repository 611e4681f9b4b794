"""Image classification: any image tower + a linear head, trained with cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from multimodal.adapt import AdaptConfig
from multimodal.models.classifier import ImageClassificationModel
from multimodal.tasks.base import Task
from multimodal.tasks.optim import OptimConfig, build_optimizer
from multimodal.train.prepare import BlockOptions


def class_rows(logits: Tensor, names: Sequence[str] | None) -> dict[str, Any]:
    """(B, C) logits -> `class_index` (B,), its softmax `probability` (B,) and, with the
    class names, `class_name` (B strings)."""
    probability, index = logits.float().softmax(dim=-1).max(dim=-1)
    rows: dict[str, Any] = {"class_index": index, "probability": probability}
    if names is not None:
        rows["class_name"] = [names[i] for i in index.tolist()]
    return rows


class ImageClassifier(Task):
    """Cross-entropy with label smoothing, optional mixup/cutmix (timm), top-1/top-5 accuracy,
    AdamW (no decay on norms, biases, embeddings) with warmup + cosine.

    Args:
        encoder: the image tower (`vision.ViT`, `vision.TimmEncoder`, or any module returning
            `TowerOutput` with an `out_dim`).
        num_classes: classes of the head.
        label_smoothing: mass spread over the other classes.
        mixup_alpha, cutmix_alpha: Beta parameters of mixup / cutmix (0 = off); with either on,
            the batch size must be even.
        head_dropout: dropout before the head.
        optim: optimiser and schedule.
        grad_checkpointing, compile, compile_backend, compile_mode: activation checkpointing
            and `torch.compile` of every transformer block (`multimodal.train.BlockOptions`;
            a timm CNN tower checkpoints with timm's own switch).
        init_from, init_strict, init_prefix_map: start from another run's weights
            (`multimodal.train.init_from`): a checkpoint or state dict, the keys that fit
            unless strict, keys renamed by {old prefix: new prefix}.
        adapt: parameter-efficient fine-tuning of the model (`multimodal.adapt.AdaptConfig`: LoRA,
            bottleneck adapters, what stays trainable), applied after `init_from`; `encoder` and
            `head`: a linear probe is `train_also: [head]`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        *,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        head_dropout: float = 0.0,
        optim: OptimConfig | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        init_from: str | None = None,
        init_strict: bool = False,
        init_prefix_map: dict[str, str] | None = None,
        adapt: AdaptConfig | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.save_hyperparameters(ignore=["encoder"])
        self.model = ImageClassificationModel(encoder, num_classes, head_dropout)
        self.block_options = BlockOptions(
            grad_checkpointing, compile, compile_backend, compile_mode
        )
        self.optim = optim or OptimConfig()
        self.label_smoothing = label_smoothing
        self.mixup: Mixup | None = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        top5 = min(5, num_classes)
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.init_weights(init_from, init_strict, init_prefix_map)
        self.adapt_model(adapt, self.model)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)  # soft targets, smoothing included
            logits = self(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = self(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            self.train_acc1(logits, labels)
            self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels)
        acc1, acc5 = getattr(self, f"{stage}_acc1"), getattr(self, f"{stage}_acc5")
        acc1(logits, labels)
        acc5(logits, labels)
        self.log(f"{stage}/loss", loss, sync_dist=True)
        self.log(f"{stage}/acc1", acc1, prog_bar=True)
        self.log(f"{stage}/acc5", acc5)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(
        self, batch: dict[str, Any] | tuple[Tensor, Tensor], batch_idx: int
    ) -> dict[str, Any]:
        """Rows of `multimodal predict` (`{"images", "keys"}` batches): `keys`,
        `class_index`, `probability` (softmax) and `class_name` when the datamodule has
        `class_names`."""
        if not isinstance(batch, dict):
            raise ValueError(
                "predict needs batches with sample keys ({'images', 'keys'}): use the "
                "datamodule's predict_dataloader"
            )
        names = getattr(self.trainer.datamodule, "class_names", None) if self._trainer else None
        return {"keys": batch["keys"], **class_rows(self(batch["images"]), names)}

    def configure_optimizers(self) -> dict:
        return build_optimizer(self.model, self.optim, self.trainer.estimated_stepping_batches)
