"""One transformer block: self-attention, optional cross-attention, feed-forward (dense or
mixture of experts), each a residual branch with a norm before (pre-norm) or after (post-norm)."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from timm.layers import DropPath
from torch import Tensor, nn

from multimodal.layers.attention import Attention, PositionBias
from multimodal.layers.config import TransformerConfig
from multimodal.layers.kv_cache import KVCache
from multimodal.layers.mlp import FeedForward
from multimodal.layers.moe import MoEFeedForward, MoEStats
from multimodal.layers.norm import create_norm


class BlockCache(NamedTuple):
    """KV caches of one block: self-attention (grows) and cross-attention (filled once)."""

    self_attn: KVCache
    cross_attn: KVCache | None


class BlockOutput(NamedTuple):
    hidden: Tensor  # (B, T, dim)
    attention: Tensor | None  # self-attention weights (B, H, T, Tk) when asked for
    cross_attention: Tensor | None  # cross-attention weights (B, H, T, S) when asked for
    moe: MoEStats | None  # routing statistics of a mixture-of-experts feed-forward


class TransformerBlock(nn.Module):
    """Self-attention [+ cross-attention] + feed-forward, configured by `TransformerConfig`.

    Args:
        config: the stack's configuration.
        drop_path: stochastic depth rate of this block's residual branches.
    """

    def __init__(self, config: TransformerConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        c = config
        self.prenorm = c.norm_order == "pre"
        self.norm1 = create_norm(c.norm, c.dim, c.norm_eps)
        attention = partial(
            Attention,
            c.dim,
            c.n_heads,
            c.n_kv_heads,
            bias=c.bias,
            dropout=c.attn_dropout,
            proj_dropout=c.dropout,
        )
        self.attn = attention(causal=c.causal, window=c.window, n_global_tokens=c.n_global_tokens)
        self.cross_norm: nn.Module | None = None
        self.cross_attn: Attention | None = None
        if c.cross_attention:
            self.cross_norm = create_norm(c.norm, c.dim, c.norm_eps)
            self.cross_attn = attention(cross=True, context_dim=c.context_dim)
        self.norm2 = create_norm(c.norm, c.dim, c.norm_eps)
        self.mlp: nn.Module
        if c.n_experts:
            self.mlp = MoEFeedForward(
                c.dim,
                c.hidden_dim,
                c.n_experts,
                top_k=c.moe_top_k,
                capacity_factor=c.moe_capacity_factor,
                activation=c.activation,
                bias=c.bias,
                dropout=c.dropout,
            )
        else:
            self.mlp = FeedForward(
                c.dim, c.hidden_dim, c.activation, bias=c.bias, dropout=c.dropout
            )
        self.is_moe = c.n_experts > 0
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _branch_input(self, x: Tensor, norm: nn.Module) -> Tensor:
        return norm(x) if self.prenorm else x

    def _add_branch(self, x: Tensor, branch: Tensor, norm: nn.Module) -> Tensor:
        x = x + self.drop_path(branch)
        return x if self.prenorm else norm(x)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        position_bias: PositionBias | None = None,
        cache: BlockCache | None = None,
        return_attention: bool = False,
    ) -> BlockOutput:
        attn = self.attn(
            self._branch_input(x, self.norm1),
            key_padding_mask=key_padding_mask,
            rope=rope,
            position_bias=position_bias,
            cache=None if cache is None else cache.self_attn,
            return_attention=return_attention,
        )
        x = self._add_branch(x, attn.output, self.norm1)
        cross_weights = None
        if self.cross_attn is not None and self.cross_norm is not None:
            cross = self.cross_attn(
                self._branch_input(x, self.cross_norm),
                context,
                key_padding_mask=context_padding_mask,
                cache=None if cache is None else cache.cross_attn,
                return_attention=return_attention,
            )
            x = self._add_branch(x, cross.output, self.cross_norm)
            cross_weights = cross.weights
        moe = None
        if self.is_moe:
            ff, moe = self.mlp(self._branch_input(x, self.norm2))
        else:
            ff = self.mlp(self._branch_input(x, self.norm2))
        x = self._add_branch(x, ff, self.norm2)
        return BlockOutput(x, attn.weights, cross_weights, moe)
