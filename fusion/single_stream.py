"""Single-stream fusion (ViLT, VisualBERT): text and image tokens concatenated into one
sequence, marked by a learned modality (token type) embedding, through one shared `Transformer`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from multimodal.layers import Transformer, TransformerConfig

POOLS = ("cls", "mean")
TEXT, IMAGE = 0, 1  # default modality ids


class SingleStreamOutput(NamedTuple):
    text: Tensor  # (B, T, dim): the joint hidden states of the text tokens
    image: Tensor  # (B, N, dim): those of the image tokens
    pooled: Tensor  # (B, dim): the first text token (CLS), or the mean over real tokens
    # per block (B, H, T + N, T + N) over [text; image], with return_attention=True
    attentions: tuple[Tensor, ...] | None = None


class SingleStreamEncoder(nn.Module):
    """One bidirectional `Transformer` over [text; image] with modality embeddings added.

    Args:
        config: the shared stack. Positions belong to each modality (text positions from the
            text embedding, patch positions from the image tower), so `position` must be
            "none": positions over the joint sequence would move the image tokens with the
            text's padding. Must not be causal, nor a mixture of experts.
        n_modalities: rows of the modality embedding: text is 0 and image 1 unless other
            ids are passed (VisualBERT's sentence A / B segments, several images).
        pool: "cls" (the first text token) or "mean" (the mean over the real tokens of both
            modalities).
    """

    def __init__(
        self, config: TransformerConfig, n_modalities: int = 2, *, pool: str = "cls"
    ) -> None:
        super().__init__()
        prefix = "TransformerConfig."
        if config.position != "none":
            raise ValueError(
                f"{prefix}position={config.position!r}: add positions per modality before "
                "fusion and use position='none'"
            )
        if config.causal:
            raise ValueError(f"{prefix}causal=True: the single-stream encoder is bidirectional")
        if config.cross_attention:
            raise ValueError(f"{prefix}cross_attention=True: a single stream has no context")
        if config.n_experts:
            raise ValueError(
                f"{prefix}n_experts={config.n_experts}: mixture-of-experts blocks are not "
                "supported here (their load-balancing loss would be dropped)"
            )
        if n_modalities < 2:
            raise ValueError(f"n_modalities={n_modalities} must be >= 2 (text and image)")
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r} must be one of {list(POOLS)}")
        self.pool = pool
        self.modality_embedding = nn.Embedding(n_modalities, config.dim)
        nn.init.normal_(self.modality_embedding.weight, std=0.02)  # as BERT's token types
        self.transformer = Transformer(config)

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        *,
        text_padding_mask: Tensor | None = None,
        image_padding_mask: Tensor | None = None,
        text_modality: Tensor | None = None,
        image_modality: Tensor | None = None,
        return_attention: bool = False,
    ) -> SingleStreamOutput:
        """Fuse text (B, T, dim) and image (B, N, dim) tokens.

        text_padding_mask (B, T), image_padding_mask (B, N): bool, True = real token.
        text_modality (B, T), image_modality (B, N): modality ids (default 0 and 1).
        return_attention: also every block's weights over the joint sequence [text; image].
        """
        B, T, _ = text.shape
        N = image.shape[1]
        if text_modality is None:
            text_modality = torch.full((B, T), TEXT, dtype=torch.long, device=text.device)
        if image_modality is None:
            image_modality = torch.full((B, N), IMAGE, dtype=torch.long, device=image.device)
        x = torch.cat([text, image], dim=1)  # (B, T + N, dim)
        modality = torch.cat([text_modality, image_modality], dim=1)  # (B, T + N)
        x = x + self.modality_embedding(modality).to(x.dtype)
        mask = None
        if text_padding_mask is not None or image_padding_mask is not None:
            mask = torch.cat(
                [
                    _real(text_padding_mask, B, T, text.device),
                    _real(image_padding_mask, B, N, image.device),
                ],
                dim=1,
            )  # (B, T + N)
        out = self.transformer(x, key_padding_mask=mask, return_attention=return_attention)
        hidden = out.hidden  # (B, T + N, dim)
        if self.pool == "cls":
            pooled = hidden[:, 0]
        elif mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = mask.to(hidden.dtype)[..., None]  # (B, T + N, 1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return SingleStreamOutput(hidden[:, :T], hidden[:, T:], pooled, out.attentions)


def _real(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """The padding mask (batch, length), all True when there is none."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return mask
