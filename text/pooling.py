"""Pooling token features (B, T, D) into one vector per sequence."""

from __future__ import annotations

import torch
from torch import Tensor

POOLINGS = ("cls", "eot", "mean")


def pool_tokens(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """hidden (B, T, D), mask (B, T) bool (True = real token) -> (B, D).

    "cls": the first token; "eot": the last real token (CLIP's end-of-text); "mean": the
    mean over real tokens.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "eot":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask).argmax(dim=1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    raise ValueError(f"pooling={pooling!r} must be one of {list(POOLINGS)}")
