"""Position information: absolute embeddings added to tokens, rotary embeddings applied to
queries and keys, and relative biases (ALiBi, T5 buckets) added to attention scores.

Absolute embeddings map positions (T,) to vectors (T, dim). Relative biases map relative
positions `key_pos - query_pos` of any shape (...) to a bias per head (n_heads, ...), so the
attention kernel can ask for exactly the (query, key) pairs it computes, dense or banded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ABSOLUTE_POSITIONS = ("sinusoidal", "learned")
RELATIVE_BIASES = ("alibi", "t5")
POSITIONS = ("none", *ABSOLUTE_POSITIONS, "rope", *RELATIVE_BIASES)


class SinusoidalPositionEmbedding(nn.Module):
    """Fixed sin/cos embedding of "Attention Is All You Need": sin on the first half of the
    features, cos on the second, wavelengths from 2*pi to base*2*pi."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim={dim} must be even for sinusoidal position embeddings")
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq  # (..., dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class LearnedPositionEmbedding(nn.Module):
    """A trained vector per position, for positions 0 .. max_positions-1."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"weight"}

    def forward(self, positions: Tensor) -> Tensor:
        return self.weight[positions]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021), rotate-half layout.

    `forward(positions)` gives (cos, sin) tables in fp32 for `apply_rotary`; the rotation of
    query i and key j then makes their dot product depend on i - j only.

    Args:
        head_dim: features per head that are rotated (even).
        base: wavelength base (10000 in the paper; larger bases reach longer contexts).
        scaling: linear position interpolation: positions are divided by this factor, so a
            model trained on n positions can be run on scaling * n.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: float = 1.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
        if scaling <= 0:
            raise ValueError(f"rope_scaling={scaling} must be > 0")
        self.scaling = scaling
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = (positions.float() / self.scaling)[..., None] * self.inv_freq  # (T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by the tables (T, D) of `RotaryEmbedding`, computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head slopes of ALiBi (Press et al. 2022): the geometric sequence 2^(-8 i / n) for a
    power-of-two n; otherwise those of the nearest power of two below, completed with every
    other slope of the next power of two, as in the paper."""

    def power_of_two(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


class ALiBi(nn.Module):
    """Attention with Linear Biases: score bias -slope_h * |key_pos - query_pos|."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, relative_positions: Tensor) -> Tensor:
        distance = relative_positions.abs().float()
        return -self.slopes.view(-1, *([1] * distance.dim())) * distance  # (H, ...)


def t5_bucket(
    relative_positions: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucket of each relative position (key - query): exact buckets for small distances,
    logarithmically wider ones up to max_distance, one last bucket beyond. Bidirectional
    attention spends half the buckets on keys after the query."""
    buckets = torch.zeros_like(relative_positions)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_positions > 0).long() * num_buckets
        distance = relative_positions.abs()
    else:
        distance = (-relative_positions).clamp(min=0)  # keys after the query share bucket 0
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned relative position bias: one scalar per (head, bucket of key - query)."""

    def __init__(
        self,
        n_heads: int,
        *,
        bidirectional: bool = True,
        num_buckets: int = 32,
        max_distance: int = 128,
    ) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def forward(self, relative_positions: Tensor) -> Tensor:
        bucket = t5_bucket(
            relative_positions, self.bidirectional, self.num_buckets, self.max_distance
        )
        bias = self.embedding(bucket)  # (..., H)
        return bias.movedim(-1, 0)  # (H, ...)
