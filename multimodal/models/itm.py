"""Image-text matching (ALBEF, BLIP): a cross-modal encoder over the text tokens attending to
the image tokens decides whether a pair matches; negatives are the hard ones, drawn from the
contrastive similarities."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fusion import cross_modal_encoder
from multimodal.layers import TransformerConfig
from multimodal.models.losses import hard_negatives


class ITMPairs(NamedTuple):
    image_index: Tensor  # (3B,) which image of the batch
    text_index: Tensor  # (3B,) which text of the batch
    labels: Tensor  # (3B,) 1 = matching pair, 0 = hard negative


class ITMHead(nn.Module):
    """(image tokens, text tokens) -> (B, 2) scores of (no match, match).

    Args:
        image_dim: width of the image tokens (the image tower's `out_dim`).
        text_dim: width of the text tokens (the text tower's `config.dim`).
        config: the cross-modal stack (bidirectional; cross-attention is switched on); text
            tokens are projected to `config.dim`, the first one is pooled (CLS / BOS).
    """

    def __init__(self, image_dim: int, text_dim: int, config: TransformerConfig) -> None:
        super().__init__()
        self.text_projection = (
            nn.Identity() if text_dim == config.dim else nn.Linear(text_dim, config.dim)
        )
        self.encoder = cross_modal_encoder(config, context_dim=image_dim)
        self.head = nn.Linear(config.dim, 2)

    def forward(
        self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor | None = None
    ) -> Tensor:
        """image_tokens (B, N, image_dim), text_tokens (B, T, text_dim), text_mask (B, T)."""
        hidden = self.encoder(
            self.text_projection(text_tokens),
            context=image_tokens,
            key_padding_mask=None if text_mask is None else text_mask.bool(),
        ).hidden
        return self.head(hidden[:, 0])

    def match_score(
        self, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor | None = None
    ) -> Tensor:
        """(B,) log-probability that each pair matches (for re-ranking retrieval)."""
        return self(image_tokens, text_tokens, text_mask).float().log_softmax(dim=-1)[:, 1]


def itm_pairs(similarity: Tensor, *, generator: torch.Generator | None = None) -> ITMPairs:
    """The B matching pairs, each image with a hard negative text and each text with a hard
    negative image (`hard_negatives`, ALBEF's sampling), from the (B, B) image-text logits."""
    b = similarity.shape[0]
    neg_text, neg_image = hard_negatives(similarity, generator=generator)
    arange = torch.arange(b, device=similarity.device)
    return ITMPairs(
        image_index=torch.cat([arange, arange, neg_image]),
        text_index=torch.cat([arange, neg_text, arange]),
        labels=torch.cat(
            [torch.ones(b, dtype=torch.long, device=similarity.device), arange.new_zeros(2 * b)]
        ),
    )
