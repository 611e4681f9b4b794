"""Dual-stream co-attention (ViLBERT, LXMERT): a text stream and an image stream of equal width,
each layer letting every stream attend to the other.

Each layer holds one `TransformerBlock` with cross-attention per stream. Both blocks read the
layer's inputs: the text block attends (self) to the text and (cross) to the image tokens as they
entered the layer, the image block likewise with the roles swapped, so the layer is symmetric
and the two blocks could run in parallel. Inside a block the order is the block's own:
self-attention, cross-attention, feed-forward.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from multimodal.layers import TransformerBlock, TransformerConfig, create_norm


class CoAttentionOutput(NamedTuple):
    text: Tensor  # (B, T, dim)
    image: Tensor  # (B, N, dim)
    # with return_attention=True, per layer: each stream's self-attention and its
    # cross-attention to the other stream
    text_attentions: tuple[Tensor, ...] | None = None  # (B, H, T, T)
    text_cross_attentions: tuple[Tensor, ...] | None = None  # (B, H, T, N)
    image_attentions: tuple[Tensor, ...] | None = None  # (B, H, N, N)
    image_cross_attentions: tuple[Tensor, ...] | None = None  # (B, H, N, T)


class CoAttentionEncoder(nn.Module):
    """Two streams, `n_layers` co-attention layers.

    Args:
        config: the blocks of both streams (width, heads, feed-forward, norms, dropout). The
            streams carry their own positions (from their towers), so `position` must be
            "none"; `causal` and mixture-of-experts feed-forwards are not supported.
            `cross_attention` and `context_dim` are set here (the context is the other
            stream, of the same width).
        n_layers: number of co-attention layers (default: `config.n_layers`).

    With pre-norm blocks the other stream's tokens are normalised (one norm per stream and
    layer) before they serve as keys and values, as the residual stream itself is not; a final
    norm per stream closes the stack unless `config.final_norm=False`.
    """

    def __init__(self, config: TransformerConfig, n_layers: int | None = None) -> None:
        super().__init__()
        prefix = "TransformerConfig."
        if config.position != "none":
            raise ValueError(
                f"{prefix}position={config.position!r}: co-attention streams come with their "
                "own positions; use position='none'"
            )
        if config.causal:
            raise ValueError(f"{prefix}causal=True: co-attention streams are bidirectional")
        if config.n_experts:
            raise ValueError(
                f"{prefix}n_experts={config.n_experts}: mixture-of-experts blocks are not "
                "supported here (their load-balancing loss would be dropped)"
            )
        if config.context_dim not in (None, config.dim):
            raise ValueError(
                f"{prefix}context_dim={config.context_dim}: both streams have width "
                f"dim={config.dim}"
            )
        n_layers = config.n_layers if n_layers is None else n_layers
        if n_layers < 0:
            raise ValueError(f"n_layers={n_layers} must be >= 0")
        c = replace(config, n_layers=n_layers, cross_attention=True, context_dim=None)
        self.config = c
        rates = torch.linspace(0, c.drop_path, n_layers, device="cpu").tolist() if n_layers else []
        self.text_blocks = nn.ModuleList(TransformerBlock(c, rate) for rate in rates)
        self.image_blocks = nn.ModuleList(TransformerBlock(c, rate) for rate in rates)
        prenorm = c.norm_order == "pre"

        def norms(n: int) -> nn.ModuleList:
            return nn.ModuleList(
                create_norm(c.norm, c.dim, c.norm_eps) if prenorm else nn.Identity()
                for _ in range(n)
            )

        # normalise a stream before the other attends to it (pre-norm residual streams grow)
        self.text_context_norms = norms(n_layers)
        self.image_context_norms = norms(n_layers)
        final = prenorm and c.final_norm
        self.text_norm = create_norm(c.norm, c.dim, c.norm_eps) if final else nn.Identity()
        self.image_norm = create_norm(c.norm, c.dim, c.norm_eps) if final else nn.Identity()

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        *,
        text_padding_mask: Tensor | None = None,
        image_padding_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> CoAttentionOutput:
        """Run both streams: text (B, T, dim), image (B, N, dim).

        text_padding_mask: (B, T), image_padding_mask: (B, N), bool, True = real token.
        Padding tokens of either stream are never attended to, by either stream.
        return_attention: also every layer's self- and cross-attention weights per stream.
        """
        dim = self.config.dim
        for name, x in (("text", text), ("image", image)):
            if x.dim() != 3 or x.shape[-1] != dim:
                raise ValueError(
                    f"expected {name} of shape (batch, tokens, {dim}), got {tuple(x.shape)}"
                )
        layers = zip(
            self.text_blocks,
            self.image_blocks,
            self.text_context_norms,
            self.image_context_norms,
            strict=True,
        )
        weights: list[tuple[Tensor | None, ...]] = []  # per layer: the four weight tensors
        for text_block, image_block, text_context_norm, image_context_norm in layers:
            text_context = text_context_norm(text)  # (B, T, dim): keys for the image stream
            image_context = image_context_norm(image)  # (B, N, dim): keys for the text stream
            text_out = text_block(
                text,
                context=image_context,
                key_padding_mask=text_padding_mask,
                context_padding_mask=image_padding_mask,
                return_attention=return_attention,
            )
            image_out = image_block(
                image,
                context=text_context,
                key_padding_mask=image_padding_mask,
                context_padding_mask=text_padding_mask,
                return_attention=return_attention,
            )
            text, image = text_out.hidden, image_out.hidden
            weights.append(
                (
                    text_out.attention,
                    text_out.cross_attention,
                    image_out.attention,
                    image_out.cross_attention,
                )
            )
        if not return_attention:
            return CoAttentionOutput(self.text_norm(text), self.image_norm(image))
        per_kind = tuple(zip(*weights, strict=True)) if weights else ((), (), (), ())
        return CoAttentionOutput(self.text_norm(text), self.image_norm(image), *per_kind)
