"""The one output type of every encoder tower (image or text)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class TowerOutput(NamedTuple):
    pooled: Tensor  # (B, out_dim): the embedding of the whole input
    tokens: Tensor | None  # (B, N, dim): per-token features (patches, a CNN's map, text tokens)
