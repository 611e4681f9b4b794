"""The one output type of every image tower."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class ImageEncoderOutput(NamedTuple):
    pooled: Tensor  # (B, out_dim): the image embedding (class token, average or attention pool)
    tokens: Tensor | None  # (B, N, dim): patch tokens (or a CNN's flattened feature map)
