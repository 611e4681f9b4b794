"""An image tower with a linear classification head."""

from __future__ import annotations

from torch import Tensor, nn


class ImageClassificationModel(nn.Module):
    """logits = Linear(dropout(encoder(images).pooled)).

    Args:
        encoder: an image tower returning `TowerOutput` and exposing `out_dim`
            (`vision.ViT`, `vision.TimmEncoder`).
        num_classes: classes of the head.
        dropout: dropout before the head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        self.encoder = encoder
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.out_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.head_drop(self.encoder(images).pooled))
