"""Patch embedding: non-overlapping patches projected to tokens by one strided convolution."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) images -> (B, H/p * W/p, dim) tokens, row-major over the patch grid.

    Args:
        patch_size: side of the square patches.
        in_channels: image channels.
        dim: token width.
        bias: bias of the projection (timm: yes; OpenAI CLIP: no).
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size, bias=bias)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Return the tokens and the patch grid (rows, columns)."""
        p = self.patch_size
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (batch, {self.in_channels}, height, width), "
                f"got {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height % p or width % p:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {p}: expected "
                f"height and width that are multiples of {p}"
            )
        x = self.proj(images)  # (B, dim, H/p, W/p)
        return x.flatten(2).transpose(1, 2), (height // p, width // p)
