"""Attention pooling: a learned query attends to the tokens (the MAP head of SigLIP / timm)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from multimodal.layers.attention import Attention
from multimodal.layers.mlp import FeedForward
from multimodal.layers.norm import create_norm


class AttentionPool(nn.Module):
    """Pool (B, N, dim) tokens into (B, dim): a learned query cross-attends to the tokens,
    followed by a residual feed-forward.

    Args:
        dim: token width.
        n_heads: attention heads.
        mlp_ratio: hidden width of the feed-forward, as a multiple of dim.
        norm: norm before the feed-forward ("layernorm" or "rmsnorm").
        norm_eps: its epsilon.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.query, std=dim**-0.5)
        self.attn = Attention(dim, n_heads, cross=True)
        self.norm = create_norm(norm, dim, norm_eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def no_weight_decay(self) -> set[str]:
        return {"query"}

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        query = self.query.expand(tokens.shape[0], -1, -1)
        x = self.attn(query, tokens, key_padding_mask=key_padding_mask).output
        x = x + self.mlp(self.norm(x))
        return x[:, 0]
