"""Drawing an attention map over its image: the map upsampled (bilinear) to the image size,
scaled to [0, 1], coloured with a matplotlib colormap and blended over the image; PNG files
written atomically."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

DEFAULT_COLORMAP = "jet"


def display_image(
    pixels: Tensor, mean: Sequence[float], std: Sequence[float], size: int = 224
) -> Image.Image:
    """A normalised (3, H, W) model input as the RGB image the model saw, enlarged by the
    largest integer factor (nearest neighbour: small digits stay crisp) that keeps its longest
    side within `size` pixels (never shrunk)."""
    if pixels.dim() != 3 or pixels.shape[0] != len(mean):
        raise ValueError(f"expected a ({len(mean)}, H, W) image tensor, got {tuple(pixels.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    rgb = (pixels.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    array = (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array if array.shape[-1] == 3 else array[..., 0])
    factor = max(1, size // max(image.size))
    if factor > 1:
        image = image.resize(
            (image.width * factor, image.height * factor), Image.Resampling.NEAREST
        )
    return image.convert("RGB")


def upsample(attention: Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (rows, columns) map -> (H, W) float32 by bilinear interpolation to `size` (H, W)."""
    grid = torch.as_tensor(np.asarray(attention, dtype=np.float32))
    if grid.dim() != 2:
        raise ValueError(f"expected a (rows, columns) attention map, got {tuple(grid.shape)}")
    out = F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def scale_unit(values: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]; a constant map (no preference) becomes all zeros."""
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("the attention map holds NaN or infinite values")
    if high - low <= 1e-12:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def heatmap(
    attention: Tensor | np.ndarray, size: tuple[int, int], colormap: str = DEFAULT_COLORMAP
) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1]: the map upsampled to `size` (H, W) and coloured."""
    from matplotlib import colormaps  # a dependency already (the evaluation plots)

    if colormap not in colormaps:
        raise ValueError(f"unknown matplotlib colormap {colormap!r}")
    return colormaps[colormap](scale_unit(upsample(attention, size)))[..., :3]


def overlay(
    image: Image.Image,
    attention: Tensor | np.ndarray,
    *,
    alpha: float = 0.5,
    colormap: str = DEFAULT_COLORMAP,
) -> Image.Image:
    """The image with the coloured map blended over it: (1 - alpha) image + alpha heatmap."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    heat = heatmap(attention, rgb.shape[:2], colormap)
    blended = (1.0 - alpha) * rgb + alpha * heat
    return Image.fromarray((blended * 255).round().clip(0, 255).astype(np.uint8))


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write `image` as a PNG at `path` atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue())


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder renamed over it, so
    a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
