"""The one output type of every encoder tower (image or text)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TowerOutput(NamedTuple):
    pooled: Tensor  # (B, out_dim): the embedding of the whole input
    tokens: Tensor | None  # (B, N, dim): per-token features (patches, a CNN's map, text tokens)
    # per block (B, H, T, T) self-attention weights over all the tower's tokens (prefix and
    # prompt tokens included), only when the tower was called with return_attention=True
    attentions: tuple[Tensor, ...] | None = None


def with_pooled_token(out: TowerOutput) -> Tensor:
    """(B, 1 + N, dim): the pooled embedding prepended to the tokens as a global token.

    What image-conditioned decoders and fusion encoders attend to: the summary the tower
    was built to produce (a class token, an attention pool) is one of the keys, and every
    parameter of the tower takes part in the loss (DDP requires that, unless it searches for
    unused parameters every step)."""
    if out.tokens is None:
        raise ValueError("the tower returns no tokens to attend to")
    if out.pooled.shape[-1] != out.tokens.shape[-1]:
        raise ValueError(
            f"the tower's pooled width {out.pooled.shape[-1]} differs from its token width "
            f"{out.tokens.shape[-1]} (a projected tower): build it without the projection"
        )
    return torch.cat([out.pooled[:, None].to(out.tokens.dtype), out.tokens], dim=1)
