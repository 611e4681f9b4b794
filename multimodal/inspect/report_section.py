"""An attention section for the evaluation reports (`multimodal.eval.report`): for each example
image its attention rollout, and for a captioner the caption with the map of every generated
token, as report tables (images embedded, as the report's other sections)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from multimodal.eval.report import Block, Section, Table, Text, image_cell
from multimodal.inspect.maps import caption_attention, image_attention, image_tower, is_captioner
from multimodal.inspect.overlay import DEFAULT_COLORMAP, display_image, overlay
from multimodal.inspect.rollout import cross_attention_maps, rollout_map


def attention_section(
    model: nn.Module,
    pixels: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    names: Sequence[str],
    *,
    tokenizer: Any = None,
    head_fusion: str = "mean",
    image_size: int = 96,
    alpha: float = 0.5,
    colormap: str = DEFAULT_COLORMAP,
    title: str = "Attention",
) -> Section:
    """A report section for example images: `pixels` (B, C, H, W) are the model's normalised
    inputs (the transform's `mean` and `std` undo it for display), `names` label them (sample
    keys). Rows: image, attention rollout; with a captioner and its `tokenizer`, also the
    generated caption, and a second table with each generated token's cross-attention (heads
    averaged, last decoder layer)."""
    if pixels.dim() != 4 or len(names) != pixels.shape[0]:
        raise ValueError(
            f"expected images (B, C, H, W) and B names, got {tuple(pixels.shape)} and "
            f"{len(names)} names"
        )
    tower = image_tower(model)
    words = is_captioner(model) and tokenizer is not None
    attention = image_attention(tower, pixels)
    rollouts = rollout_map(attention.attentions, attention.layout, head_fusion)
    columns = ["key", "image", "rollout"] + (["caption"] if words else [])
    rows: list[list[Any]] = []
    word_rows: list[list[Any]] = []
    for i, name in enumerate(names):
        shown = display_image(pixels[i], mean, std, image_size)
        heat = overlay(shown, rollouts[i], alpha=alpha, colormap=colormap)
        row: list[Any] = [
            name,
            image_cell(shown, size=image_size),
            image_cell(heat, size=image_size),
        ]
        if words:
            caption = caption_attention(model, pixels[i : i + 1])
            row.append(tokenizer.decode(caption.token_ids))
            maps = cross_attention_maps(caption.cross_attentions, attention.layout.grid)[0]
            for position, token in enumerate(caption.token_ids):
                word = tokenizer.decode([token], skip_special_tokens=False) or f"[id {token}]"
                word_heat = overlay(shown, maps[position], alpha=alpha, colormap=colormap)
                word_rows.append([name, position, word, image_cell(word_heat, size=image_size)])
        rows.append(row)
    source = "class token" if attention.layout.source == "cls" else "mean of the patch tokens"
    blocks: list[Block] = [
        Text(
            f"Attention rollout of the image tower ({head_fusion} of the heads; read from the "
            f"{source}), each map scaled to its own range."
        ),
        Table(columns, rows),
    ]
    if words:
        blocks.append(
            Table(
                ["key", "position", "token", "cross-attention (last layer, heads averaged)"],
                word_rows,
                caption="Where the decoder looked when it generated each token",
            )
        )
    return Section(title, blocks)
