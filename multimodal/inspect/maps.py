"""Running a model to get its attention over an image: the image tower's self-attention (for
rollout and per-layer maps), a captioner's cross-attention for each word it generates, and a
CLIP model's image-text similarities to show beside them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.inspect.rollout import PatchLayout, vit_layout
from vision.vit import ViT


class ImageAttention(NamedTuple):
    attentions: tuple[Tensor, ...]  # per block (B, H, T, T), the image tower's self-attention
    layout: PatchLayout  # where the patches are among the T tokens


class CaptionAttention(NamedTuple):
    token_ids: list[int]  # the generated caption, end-of-sequence excluded
    # per decoder block (1, H, n, 1 + N): row i is the query that predicted token_ids[i], over
    # [pooled image token; N patches]
    cross_attentions: tuple[Tensor, ...]


def image_tower(model: nn.Module) -> nn.Module:
    """The model's image tower (CLIP, captioner, VQA model) or the model itself (a ViT);
    ValueError when it is not a `vision.ViT`, the tower that returns attention weights."""
    tower = getattr(model, "image_tower", model)
    if not isinstance(tower, ViT):
        raise ValueError(
            "attention maps need a vision.ViT image tower (it returns its attention weights); "
            f"{type(model).__name__} has {type(tower).__name__}"
        )
    return tower


@torch.no_grad()
def image_attention(tower: nn.Module, images: Tensor) -> ImageAttention:
    """Every block's self-attention weights of a ViT over images (B, C, H, W)."""
    layout = vit_layout(tower, tuple(images.shape[-2:]))
    out = tower(images, return_attention=True)
    return ImageAttention(tuple(w.float() for w in out.attentions), layout)


def is_captioner(model: nn.Module) -> bool:
    """A model that writes captions for images from a decoder cross-attending to them."""
    decoder = getattr(model, "decoder", None)
    config = getattr(decoder, "config", None)
    return (
        callable(getattr(model, "generate", None))
        and config is not None
        and getattr(config.transformer, "cross_attention", False)
    )


def can_compare_texts(model: nn.Module) -> bool:
    """Whether the model embeds images and texts in one space (CLIP, a CoCa captioner)."""
    return callable(getattr(model, "encode_text", None)) and getattr(model, "contrastive", True)


@torch.no_grad()
def caption_attention(
    captioner: nn.Module, image: Tensor, generation: Any = None
) -> CaptionAttention:
    """Caption one image (1, C, H, W) with `captioner.generate` (default: greedy) and replay the
    caption through the model with teacher forcing to read the decoder's cross-attention: the
    decoder is causal, so query i of the replay sees what generation saw when it chose word i."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got {tuple(image.shape)}")
    config = captioner.decoder.config
    generated = captioner.generate(image, generation).sequences[0].tolist()
    ids = generated[: generated.index(config.eos_id)] if config.eos_id in generated else generated
    inputs = torch.tensor([[config.bos_id, *ids]], device=image.device)
    out = captioner(image, inputs, return_attention=True)
    n = len(ids)
    return CaptionAttention(ids, tuple(w[:, :, :n].float() for w in out.cross_attentions))


@torch.no_grad()
def text_similarities(
    model: nn.Module, tokenizer: Any, context_length: int, images: Tensor, texts: Sequence[str]
) -> Tensor:
    """(B, len(texts)) cosine similarities of the images' and the texts' embeddings."""
    tokens = tokenizer.batch_encode(list(texts), max_length=context_length)
    device = images.device
    text = model.encode_text(tokens.input_ids.to(device), tokens.attention_mask.to(device))
    image = model.encode_image(images)
    return F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
