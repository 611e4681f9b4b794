"""Gated cross-attention (Flamingo): new cross-attention and feed-forward sub-layers whose
residual branches are scaled by tanh(alpha), alpha initialised at 0, so that inserting them into
a pretrained decoder leaves its outputs unchanged at initialisation while the gates still learn
(d tanh / d alpha = 1 at 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from multimodal.layers import (
    Attention,
    AttentionOutput,
    BlockCache,
    FeedForward,
    Transformer,
    TransformerOutput,
    create_norm,
)


class GatedCrossAttention(nn.Module):
    """x + tanh(alpha_attn) * cross_attn(norm(x), context), then
    x + tanh(alpha_ff) * ff(norm(x)); exactly the identity while both alphas are 0.

    Args:
        dim: width of x.
        context_dim: width of the context (image / media tokens).
        n_heads: query heads; n_kv_heads: key/value heads (None = n_heads).
        hidden_dim: feed-forward width (default: mlp_ratio * dim).
        activation, norm, norm_eps, bias: as in `TransformerConfig`.
        dropout: on both residual branches; attn_dropout: on the attention weights.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        hidden_dim: int | None = None,
        mlp_ratio: float = 4.0,
        activation: str = "gelu",
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_norm = create_norm(norm, dim, norm_eps)
        self.attn = Attention(
            dim,
            n_heads,
            n_kv_heads,
            cross=True,
            context_dim=context_dim,
            bias=bias,
            dropout=attn_dropout,
            proj_dropout=dropout,
        )
        self.ff_norm = create_norm(norm, dim, norm_eps)
        self.ff = FeedForward(
            dim, hidden_dim or int(mlp_ratio * dim), activation, bias=bias, dropout=dropout
        )
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_ff = nn.Parameter(torch.zeros(()))

    def forward(
        self, x: Tensor, context: Tensor, *, context_padding_mask: Tensor | None = None
    ) -> Tensor:
        """x (B, T, dim) attends to context (B, S, context_dim); context_padding_mask (B, S)
        bool, True = real token. Returns (B, T, dim)."""
        return self._run(x, context, context_padding_mask, return_attention=False).output

    def forward_with_attention(
        self, x: Tensor, context: Tensor, *, context_padding_mask: Tensor | None = None
    ) -> AttentionOutput:
        """As `forward`, with the cross-attention weights (B, H, T, S) (computed explicitly)."""
        return self._run(x, context, context_padding_mask, return_attention=True)

    def _run(
        self,
        x: Tensor,
        context: Tensor,
        context_padding_mask: Tensor | None,
        return_attention: bool,
    ) -> AttentionOutput:
        attn = self.attn(
            self.attn_norm(x),
            context,
            key_padding_mask=context_padding_mask,
            return_attention=return_attention,
        )
        x = x + self.alpha_attn.tanh() * attn.output  # (B, T, dim)
        return AttentionOutput(x + self.alpha_ff.tanh() * self.ff(self.ff_norm(x)), attn.weights)


class GatedDecoder(nn.Module):
    """An existing `Transformer` (a pretrained decoder) with a `GatedCrossAttention` in front of
    every `every`-th block (blocks 0, every, 2 * every, ...), run with a context.

    The decoder's modules and state-dict keys stay as they are (`decoder.*`; the new layers
    are `gated.<block index>.*`): the gated layers are applied by forward pre-hooks on the
    chosen blocks, which read the context of the current `GatedDecoder` call. Calling the
    decoder on its own (no context) runs it unchanged. KV-cache decoding works (the gated
    layers recompute the context's keys each step); gradient checkpointing of the decoder
    does not (its recomputation happens after the call) and is refused in training.

    Args:
        decoder: the stack to extend; its config gives the gated layers' heads, feed-forward,
            norm and bias.
        context_dim: width of the context tokens (default: the decoder's dim).
        every: insert a gated layer before every `every`-th block.
        freeze_decoder: set requires_grad=False on the decoder's parameters (Flamingo).
    """

    def __init__(
        self,
        decoder: Transformer,
        context_dim: int | None = None,
        *,
        every: int = 1,
        freeze_decoder: bool = False,
    ) -> None:
        super().__init__()
        if every <= 0:
            raise ValueError(f"every={every} must be > 0")
        c = decoder.config
        if c.cross_attention:
            raise ValueError(
                "the decoder already has cross-attention (TransformerConfig.cross_attention=True)"
            )
        self.decoder = decoder
        self.gated = nn.ModuleDict(
            {
                str(i): GatedCrossAttention(
                    c.dim,
                    context_dim or c.dim,
                    c.n_heads,
                    c.n_kv_heads,
                    hidden_dim=c.hidden_dim,
                    activation=c.activation,
                    norm=c.norm,
                    norm_eps=c.norm_eps,
                    bias=c.bias,
                    dropout=c.dropout,
                    attn_dropout=c.attn_dropout,
                )
                for i in range(0, len(decoder.blocks), every)
            }
        )
        if freeze_decoder:
            decoder.requires_grad_(False)
        self._context: tuple[Tensor, Tensor | None] | None = None
        self._weights: list[Tensor] | None = None  # filled by the hooks with return_attention
        self._hooks: list[RemovableHandle] = [
            decoder.blocks[int(i)].register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
            for i in self.gated
        ]

    def _pre_hook(self, index: str):
        def hook(
            block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if self._context is None:  # the decoder called on its own
                return None
            context, context_padding_mask = self._context
            gated = self.gated[index]
            if self._weights is None:
                x = gated(args[0], context, context_padding_mask=context_padding_mask)
            else:
                x, weights = gated.forward_with_attention(
                    args[0], context, context_padding_mask=context_padding_mask
                )
                self._weights.append(weights)
            return (x, *args[1:]), kwargs

        return hook

    def remove_hooks(self) -> None:
        """Detach the gated layers from the decoder's blocks (the decoder is then as before)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: list[BlockCache] | None = None,
        return_attention: bool = False,
    ) -> TransformerOutput:
        """Run the decoder over x (B, T, dim) with the gated layers attending to context
        (B, S, context_dim); masks (B, T) and (B, S), True = real token. `positions` and
        `cache` as in `Transformer.forward`.

        return_attention: `attentions` holds the decoder blocks' self-attention weights and
        `cross_attentions` the gated layers' (B, H, T, S), one per gated layer in block order
        (blocks 0, every, 2 * every, ...)."""
        if self.decoder.grad_checkpointing and self.training:
            raise ValueError("gradient checkpointing of the decoder is not supported here")
        self._context = (context, context_padding_mask)
        self._weights = [] if return_attention else None
        try:
            out = self.decoder(
                x,
                key_padding_mask=key_padding_mask,
                positions=positions,
                cache=cache,
                return_attention=return_attention,
            )
            if return_attention:
                out = out._replace(cross_attentions=tuple(self._weights))
            return out
        finally:
            self._context = None
            self._weights = None
