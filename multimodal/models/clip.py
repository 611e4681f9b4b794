"""CLIP: an image tower and a text tower projected into one embedding space (Radford et al.
2021), with the learnable temperature of CLIP or the scale and bias of SigLIP."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CLIPOutput(NamedTuple):
    image_features: Tensor  # (B, embed_dim), L2-normalised
    text_features: Tensor  # (B, embed_dim), L2-normalised
    logit_scale: Tensor  # the multiplier of the cosine similarities (exp of the parameter)
    logit_bias: Tensor | None  # SigLIP's bias, None for CLIP
    image_tokens: Tensor | None = None  # (B, N, image dim) with return_tokens=True
    text_tokens: Tensor | None = None  # (B, T, text dim) with return_tokens=True


class ClipLike(nn.Module, ABC):
    """What every CLIP-style model offers (our `CLIP`, `OpenCLIP`): the interface that
    `ContrastivePretraining`, zero-shot / retrieval evaluation and the zero-shot callback use,
    so any subclass trains and evaluates everywhere.

    Attributes: `embed_dim` (width of the joint space) and `logit_bias` (SigLIP's learnable
    bias, None for CLIP).
    """

    embed_dim: int
    logit_bias: nn.Parameter | None

    @abstractmethod
    def encode_image(self, images: Tensor, *, normalize: bool = True) -> Tensor:
        """(B, C, H, W) -> (B, embed_dim)."""

    @abstractmethod
    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
    ) -> Tensor:
        """(B, T) token ids -> (B, embed_dim)."""

    @abstractmethod
    def scale(self) -> Tensor:
        """The logit multiplier (0-d), clamped at the model's maximum."""

    @abstractmethod
    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        return_tokens: bool = False,
    ) -> CLIPOutput:
        """Normalised embeddings of both towers, the scale and the bias."""

    @abstractmethod
    def no_weight_decay(self) -> set[str]:
        """Names of parameters trained without weight decay (temperature, bias)."""

    @abstractmethod
    def lock_image_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the image tower except its last `unlocked_layers` blocks (with what follows
        them: final norm, pooling); the projection into the joint space still trains (LiT)."""

    @abstractmethod
    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower except its last `unlocked_layers` blocks (with what follows
        them); the projection into the joint space still trains."""


def lock_tower(tower: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze `tower` except its last `unlocked_layers` blocks and every parameter registered
    after them (final norm, pooling head): the tower's `blocks` sequence (ours and timm's
    transformers) is found by name, its parameter order is the order of computation."""
    if unlocked_layers < 0:
        raise ValueError(f"unlocked_layers={unlocked_layers} must be >= 0")
    tower.requires_grad_(False)
    if unlocked_layers == 0:
        return
    stacks = [
        module
        for name, module in tower.named_modules()
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.ModuleList | nn.Sequential)
    ]
    if len(stacks) != 1:
        raise ValueError(
            f"unlocked_layers={unlocked_layers} needs a tower with one sequence of `blocks`; "
            f"{type(tower).__name__} has {len(stacks)}"
        )
    blocks = stacks[0]
    if unlocked_layers > len(blocks):
        raise ValueError(
            f"unlocked_layers={unlocked_layers} exceeds the {len(blocks)} blocks of "
            f"{type(tower).__name__}"
        )
    first = next(blocks[len(blocks) - unlocked_layers].parameters())
    unlocked = False
    for parameter in tower.parameters():
        unlocked = unlocked or parameter is first
        if unlocked:
            parameter.requires_grad_(True)


class CLIP(ClipLike):
    """Joint image-text embedding model; receives tower instances, never builds them.

    Args:
        image_tower: returns `TowerOutput` and has `out_dim` (`vision.ViT`, `vision.TimmEncoder`).
        text_tower: `text.TextEncoder(input_ids, attention_mask) -> TowerOutput` with `out_dim`.
        embed_dim: width of the joint space; each tower gets a linear projection to it.
        init_logit_scale: initial temperature as a multiplier (CLIP: 1/0.07; SigLIP: 10).
        max_logit_scale: the multiplier is clamped at this value (CLIP: 100).
        init_logit_bias: a learnable bias on the logits (SigLIP: -10); None for CLIP.
    """

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        embed_dim: int = 512,
        *,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0:
            raise ValueError(f"embed_dim={embed_dim} must be > 0")
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ValueError(
                f"init_logit_scale={init_logit_scale} must be in "
                f"(0, max_logit_scale={max_logit_scale}]"
            )
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.embed_dim = embed_dim
        self.image_projection = nn.Linear(image_tower.out_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.out_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(init_logit_bias)))
            if init_logit_bias is not None
            else None
        )

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "logit_bias"}

    def lock_image_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the image tower but its last `unlocked_layers` blocks (LiT: locked-image
        tuning); its projection still trains."""
        lock_tower(self.image_tower, unlocked_layers)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower but its last `unlocked_layers` blocks; its projection still
        trains."""
        lock_tower(self.text_tower, unlocked_layers)

    def encode_image(self, images: Tensor, *, normalize: bool = True) -> Tensor:
        """(B, C, H, W) -> (B, embed_dim)."""
        features = self.image_projection(self.image_tower(images).pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
    ) -> Tensor:
        """(B, T) token ids -> (B, embed_dim)."""
        features = self.text_projection(self.text_tower(input_ids, attention_mask).pooled)
        return F.normalize(features, dim=-1) if normalize else features

    def scale(self) -> Tensor:
        """The logit multiplier exp(logit_scale), clamped at max_logit_scale."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        return_tokens: bool = False,
    ) -> CLIPOutput:
        """Normalised embeddings of both towers; with return_tokens also their token
        features (for an image-text matching head)."""
        image = self.image_tower(images)
        text = self.text_tower(input_ids, attention_mask)
        return CLIPOutput(
            F.normalize(self.image_projection(image.pooled), dim=-1),
            F.normalize(self.text_projection(text.pooled), dim=-1),
            self.scale(),
            self.logit_bias,
            image.tokens if return_tokens else None,
            text.tokens if return_tokens else None,
        )
