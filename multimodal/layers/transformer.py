"""A stack of transformer blocks with its position information, the core of every tower."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multimodal.layers.block import BlockCache, TransformerBlock
from multimodal.layers.config import TransformerConfig
from multimodal.layers.kv_cache import KVCache
from multimodal.layers.moe import MoEStats
from multimodal.layers.norm import create_norm
from multimodal.layers.position import (
    ALiBi,
    LearnedPositionEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionEmbedding,
)


class TransformerOutput(NamedTuple):
    hidden: Tensor  # (B, T, dim), after the final norm of a pre-norm stack
    aux_loss: Tensor  # sum of the MoE load-balancing losses (0 without experts)
    attentions: tuple[Tensor, ...] | None  # per block (B, H, T, Tk) when asked for
    cross_attentions: tuple[Tensor, ...] | None  # per block (B, H, T, S) when asked for
    moe: tuple[MoEStats, ...]  # per MoE block: aux loss, dropped share, load per expert


class Transformer(nn.Module):
    """`config.n_layers` blocks over token embeddings (B, T, dim).

    Owns the position scheme of the config: absolute embeddings are added to the input,
    rotary tables and relative biases are computed once per forward and shared by the blocks.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.position_embedding: nn.Module | None = None
        self.rope: RotaryEmbedding | None = None
        self.position_bias: nn.Module | None = None
        if c.position == "sinusoidal":
            self.position_embedding = SinusoidalPositionEmbedding(c.dim)
        elif c.position == "learned":
            self.position_embedding = LearnedPositionEmbedding(c.max_positions, c.dim)
        elif c.position == "rope":
            self.rope = RotaryEmbedding(c.head_dim, c.rope_base, c.rope_scaling)
        elif c.position == "alibi":
            self.position_bias = ALiBi(c.n_heads)
        elif c.position == "t5":
            self.position_bias = RelativePositionBias(
                c.n_heads,
                bidirectional=not c.causal,
                num_buckets=c.relative_buckets,
                max_distance=c.relative_max_distance,
            )
        self.input_norm = create_norm(c.norm, c.dim, c.norm_eps) if c.input_norm else nn.Identity()
        self.input_dropout = nn.Dropout(c.input_dropout)
        rates = (
            torch.linspace(0, c.drop_path, c.n_layers, device="cpu").tolist() if c.n_layers else []
        )
        self.blocks = nn.ModuleList(TransformerBlock(c, rate) for rate in rates)
        final_norm = c.norm_order == "pre" and c.final_norm
        self.norm = create_norm(c.norm, c.dim, c.norm_eps) if final_norm else nn.Identity()
        self.grad_checkpointing = False
        # deep visual prompt tuning (multimodal.adapt.prompt): before every block i >= 1 the
        # tokens [prompt_start, prompt_start + P) are replaced by deep_prompts[i - 1]
        self.deep_prompts: nn.Parameter | None = None  # (n_layers - 1, P, dim)
        self.prompt_start = 0

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: less memory, same gradients."""
        self.grad_checkpointing = enable

    def init_cache(self, capacity: int = 64) -> list[BlockCache]:
        """Empty KV caches for incremental decoding, one per block."""
        cross = self.config.cross_attention
        return [
            BlockCache(KVCache(capacity), KVCache(capacity) if cross else None) for _ in self.blocks
        ]

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: list[BlockCache] | None = None,
        return_attention: bool = False,
    ) -> TransformerOutput:
        """Run the blocks over x (B, T, dim).

        context: (B, S, context_dim) for cross-attention, with context_padding_mask (B, S).
        key_padding_mask: (B, T) bool, True = real token; with a cache, (B, cached + T).
        positions: (B, T) positions of the tokens for absolute and rotary embeddings, when
            they differ per row (left-padded batches); default: cached length + 0 .. T-1.
            Masks and relative biases always use the shared order, which padding does not
            change for the real tokens.
        cache: from `init_cache`; x then holds the next tokens after the cached ones.
        """
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.dim:
            raise ValueError(
                f"expected input of shape (batch, tokens, {c.dim}), got {tuple(x.shape)}"
            )
        if c.cross_attention and context is None:
            raise ValueError("this stack has cross-attention: pass context=(batch, tokens, dim)")
        if context is not None and not c.cross_attention:
            raise ValueError("a context was given but the config has cross_attention=False")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers, the stack has {len(self.blocks)}")
        T = x.shape[1]
        offset = cache[0].self_attn.length if cache else 0
        if positions is None:
            positions = torch.arange(offset, offset + T, device=x.device)
        elif positions.shape != x.shape[:2]:
            raise ValueError(f"positions must be (batch, tokens) = {tuple(x.shape[:2])}")
        if self.position_embedding is not None:
            if offset + T > c.max_positions:
                raise ValueError(
                    f"sequence of {offset + T} tokens exceeds max_positions={c.max_positions} "
                    f"of the {c.position} position embedding"
                )
            x = x + self.position_embedding(positions).to(x.dtype)
        x = self.input_dropout(self.input_norm(x))
        rope = None
        if self.rope is not None:
            cos, sin = self.rope(positions)  # (T, D) or (B, T, D)
            rope = (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])

        attentions, cross_attentions, moe = [], [], []
        if self.deep_prompts is not None and cache is not None:
            raise ValueError("deep prompts replace tokens between blocks: no KV cache")
        for i, block in enumerate(self.blocks):
            if i and self.deep_prompts is not None:
                x = replace_tokens(x, self.deep_prompts[i - 1], self.prompt_start)
            kwargs = dict(
                context=context,
                key_padding_mask=key_padding_mask,
                context_padding_mask=context_padding_mask,
                rope=rope,
                position_bias=self.position_bias,
                cache=None if cache is None else cache[i],
                return_attention=return_attention,
            )
            if self.grad_checkpointing and self.training and cache is None:
                out = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                out = block(x, **kwargs)
            x = out.hidden
            attentions.append(out.attention)
            cross_attentions.append(out.cross_attention)
            if out.moe is not None:
                moe.append(out.moe)
        aux_loss = sum((m.aux_loss for m in moe), x.new_zeros((), dtype=torch.float32))
        return TransformerOutput(
            hidden=self.norm(x),
            aux_loss=aux_loss,
            attentions=tuple(attentions) if return_attention else None,
            cross_attentions=tuple(cross_attentions)
            if return_attention and c.cross_attention
            else None,
            moe=tuple(moe),
        )


def replace_tokens(x: Tensor, tokens: Tensor, start: int) -> Tensor:
    """x (B, T, dim) with positions [start, start + P) replaced by tokens (P, dim)."""
    new = tokens.to(x.dtype).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], new, x[:, start + tokens.shape[0] :]], dim=1)
