"""Position embeddings of a patch grid: resampling learned ones to a new grid, and fixed 2-D
sin-cos ones computed for any grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resample_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], n_prefix: int = 0
) -> Tensor:
    """Interpolate (1, n_prefix + rows * cols, D) position embeddings to another grid.

    The first `n_prefix` (class / register token) embeddings are kept as they are; the grid
    part is resized bicubically (antialiased when shrinking), as timm does for ViTs.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    D = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, D).permute(0, 3, 1, 2).float()  # (1, D, rows, cols)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def sincos_2d_pos_embed(grid: tuple[int, int], dim: int, base: float = 10000.0) -> Tensor:
    """Fixed (rows * cols, dim) embedding: half the features encode the row with sin/cos at
    geometric frequencies, half the column (MAE, "Masked Autoencoders Are Scalable...")."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    omega = base ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * omega
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()
