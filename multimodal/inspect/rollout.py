"""Attention maps over image patches: attention rollout (Abnar & Zuidema 2020) through a ViT,
the raw map of one layer (one head, or the heads averaged), and where a captioner's decoder
looked at the image for each word.

Written by hand: timm and open_clip return no attention weights, and the packages that draw
rollouts (e.g. `vit-explain`) hook timm's modules; our towers return the weights themselves
(`return_attention=True`), so the rollout is a few matrix products over them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from vision.vit import ViT

HEAD_FUSIONS = ("mean", "max")
SOURCES = ("cls", "mean")


class PatchLayout(NamedTuple):
    """Where the patches are among a tower's tokens and how they tile the image.

    leading: tokens before the patches (class token, registers, visual prompts);
    grid: (rows, columns) of patches, in row-major token order;
    source: whose attention the image map shows: "cls" (the class token's row, what a
    class-token pool reads) or "mean" (the mean of the patch rows, what an average pool reads).
    """

    leading: int
    grid: tuple[int, int]
    source: str

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def vit_layout(vit: ViT, image_size: tuple[int, int]) -> PatchLayout:
    """The `PatchLayout` of a `vision.ViT` for images of `image_size` (H, W) pixels.

    The map is read where the tower's pooled output comes from: the class token's row for
    pool "token", the mean of the patch rows for pool "avg" (and for "attn", whose learned
    query's own weights are not part of the rollout)."""
    if not isinstance(vit, ViT):
        raise ValueError(
            f"attention maps need a vision.ViT image tower (it returns its attention weights); "
            f"got {type(vit).__name__}"
        )
    config = vit.config
    H, W = image_size
    p = config.patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    return PatchLayout(
        vit.n_leading_tokens, (H // p, W // p), "cls" if config.pool == "token" else "mean"
    )


def fuse_heads(weights: Tensor, fusion: str = "mean") -> Tensor:
    """(B, H, Tq, Tk) -> (B, Tq, Tk): the heads' mean or elementwise max."""
    if fusion not in HEAD_FUSIONS:
        raise ValueError(f"head fusion {fusion!r} must be one of {list(HEAD_FUSIONS)}")
    if weights.dim() != 4:
        raise ValueError(f"expected attention weights (B, H, Tq, Tk), got {tuple(weights.shape)}")
    return weights.mean(dim=1) if fusion == "mean" else weights.amax(dim=1)


def select_head(weights: Tensor, head: int | str = "mean") -> Tensor:
    """(B, H, Tq, Tk) -> (B, Tq, Tk): one head (an index, negative from the end) or "mean"."""
    if head == "mean":
        return fuse_heads(weights, "mean")
    n_heads = weights.shape[1]
    if not isinstance(head, int) or not -n_heads <= head < n_heads:
        raise ValueError(f"head {head!r} must be 'mean' or an index in [0, {n_heads})")
    return weights[:, head]


def attention_rollout(attentions: Sequence[Tensor], head_fusion: str = "mean") -> Tensor:
    """Attention rollout over self-attention weights, first layer first: (B, T, T).

    Per layer the heads are fused (mean or max), the identity is added for the residual
    connection and rows are normalised to sum to 1; the layers' matrices are multiplied from
    the first: R = A_L ... A_2 A_1. Row i of R is how much each input token flows into the
    output token i; every row sums to 1."""
    if not attentions:
        raise ValueError("attention rollout needs the weights of at least one layer")
    rollout = None
    for weights in attentions:
        weights = weights.to(torch.promote_types(weights.dtype, torch.float32))  # bf16 -> fp32
        fused = fuse_heads(weights, head_fusion)  # (B, T, T)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        fused = fused + eye
        fused = fused / fused.sum(dim=-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout
    return rollout


def patch_map(matrix: Tensor, layout: PatchLayout) -> Tensor:
    """(B, T, T) token-to-token weights -> (B, rows, columns): the layout's source row(s) over
    the patch columns, on the patch grid (not renormalised: the prefix tokens keep their
    share)."""
    n = layout.leading + layout.n_patches
    if matrix.shape[-1] != n or matrix.shape[-2] != n:
        raise ValueError(
            f"expected ({n}, {n}) weights ({layout.leading} leading tokens + "
            f"{layout.n_patches} patches), got {tuple(matrix.shape[-2:])}"
        )
    patches = matrix[..., layout.leading :]  # (B, T, N)
    if layout.source == "cls":
        row = patches[:, 0]
    elif layout.source == "mean":
        row = patches[:, layout.leading :].mean(dim=1)
    else:
        raise ValueError(f"layout source {layout.source!r} must be one of {list(SOURCES)}")
    return row.reshape(row.shape[0], *layout.grid)


def rollout_map(
    attentions: Sequence[Tensor], layout: PatchLayout, head_fusion: str = "mean"
) -> Tensor:
    """(B, rows, columns): the rollout of a ViT's attention weights over its patches."""
    return patch_map(attention_rollout(attentions, head_fusion), layout)


def layer_map(
    attentions: Sequence[Tensor], layout: PatchLayout, layer: int, head: int | str = "mean"
) -> Tensor:
    """(B, rows, columns): one layer's attention (one head or the heads' mean) over patches."""
    return patch_map(select_head(attentions[_layer_index(layer, len(attentions))], head), layout)


def cross_attention_maps(
    cross_attentions: Sequence[Tensor],
    grid: tuple[int, int],
    layer: int = -1,
    head: int | str = "mean",
    *,
    leading: int = 1,
) -> Tensor:
    """(B, Tq, rows, columns): for each decoder query, one layer's cross-attention over the
    image patches (a captioner attends to [pooled token; patches]: `leading=1`)."""
    weights = select_head(cross_attentions[_layer_index(layer, len(cross_attentions))], head)
    n = leading + grid[0] * grid[1]
    if weights.shape[-1] != n:
        raise ValueError(
            f"expected cross-attention over {n} keys ({leading} leading + {grid[0]}x{grid[1]} "
            f"patches), got {weights.shape[-1]}"
        )
    return weights[..., leading:].reshape(*weights.shape[:2], *grid)


def _layer_index(layer: int, n_layers: int) -> int:
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} must be in [0, {n_layers}) (or negative from the end)")
    return layer
