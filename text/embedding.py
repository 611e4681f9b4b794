"""Token (and segment) embeddings, and the length check every text model applies."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from text.config import TextConfig


class TextEmbedding(nn.Module):
    """input ids (B, T) [+ segment ids (B, T)] -> (B, T, dim). Positions are the stack's."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.dim)
        self.segment = nn.Embedding(config.n_segments, config.dim) if config.n_segments else None
        nn.init.normal_(self.token.weight, std=0.02)
        if self.segment is not None:
            nn.init.normal_(self.segment.weight, std=0.02)

    def forward(self, input_ids: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        x = self.token(input_ids)
        if segment_ids is not None:
            if self.segment is None:
                raise ValueError("segment_ids given, but the model has n_segments=0")
            x = x + self.segment(segment_ids)
        return x


def fit_length(
    config: TextConfig, *tensors: Tensor | None, offset: int = 0, reserved: int = 0
) -> list[Tensor | None]:
    """Check (or, with `config.truncate`, cut) (B, T, ...) tensors against max_positions.

    `offset` counts tokens already in a KV cache, `reserved` the soft prompt put before them.
    """
    length = next(t for t in tensors if t is not None).shape[1]
    limit = config.max_positions - offset - reserved
    if length <= limit:
        return list(tensors)
    if not config.truncate or offset > 0:  # tokens after a KV cache cannot be cut
        raise ValueError(
            f"input of {offset + length} tokens is longer than the model's maximum of "
            f"{config.max_positions} positions (TextConfig.truncate=True cuts it instead)"
        )
    return [None if t is None else t[:, :limit] for t in tensors]


def prepend_prompt(
    prompt: Tensor,
    x: Tensor,
    attention_mask: Tensor | None,
    positions: Tensor | None,
    *,
    first: int = 0,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Put a soft prompt (P, dim) before the token embeddings x (B, T, dim).

    The attention mask (B, T) gets P ones in front. The prompt takes position 0 and the tokens
    keep their own positions (B, T) (default first .. first + T - 1), so absolute and rotary
    positions of the tokens are those of the model without a prompt. Returns x (B, P + T, dim),
    the mask and positions (B, P + T).
    """
    B, T, _ = x.shape
    P = prompt.shape[0]
    if positions is None:
        positions = torch.arange(first, first + T, device=x.device).expand(B, T)
    positions = torch.cat([positions.new_zeros(B, P), positions], dim=1)
    x = torch.cat([prompt.to(x.dtype).expand(B, -1, -1), x], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    return x, attention_mask, positions
