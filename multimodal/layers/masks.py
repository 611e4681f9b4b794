"""Boolean attention masks from token positions. True means "this query may attend to this key".

Masks are built from the positions of queries and keys rather than from sequence lengths, so the
same rules serve a full forward pass, a banded (sliding-window) computation and incremental
decoding with a KV cache, where the queries are the last few positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def position_mask(
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    causal: bool,
    window: int | None = None,
    n_global_tokens: int = 0,
) -> Tensor:
    """Mask (..., Tq, Tk) from positions (..., Tq) and (..., Tk), padded positions included.

    - causal: key j is visible to query i only if j <= i;
    - window w: only keys at distance < w (causal: i - w < j <= i; otherwise |i - j| < w);
    - global tokens (Longformer / attention sinks): keys at positions < n_global_tokens are
      visible to every query, and without causal masking those tokens see every key.
    Causal masking always holds, also for global tokens.
    """
    q = query_positions[..., :, None]
    k = key_positions[..., None, :]
    distance = q - k
    allowed = distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    if window is not None:
        local = distance.abs() < window
        if n_global_tokens:
            local = local | (k < n_global_tokens)
            if not causal:
                local = local | (q < n_global_tokens)
        allowed = allowed & local
    return allowed


def merge_padding(mask: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
    """Combine a (Tq, Tk) or (B, Tq, Tk)-like mask with a key padding mask (B, Tk), True = real
    token, into a mask broadcastable to (B, H, Tq, Tk)."""
    if key_padding_mask is None:
        return mask
    padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
    return padding if mask is None else padding & mask
