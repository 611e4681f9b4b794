"""Transformer primitives shared by every tower: attention, positions, norms, feed-forward,
mixture of experts, blocks and the stack."""

from multimodal.layers.attention import Attention, AttentionOutput, attend, banded_attend
from multimodal.layers.block import BlockCache, BlockOutput, TransformerBlock
from multimodal.layers.config import TransformerConfig
from multimodal.layers.kv_cache import KVCache
from multimodal.layers.masks import merge_padding, position_mask
from multimodal.layers.mlp import FeedForward
from multimodal.layers.moe import MoEFeedForward, MoEStats
from multimodal.layers.norm import create_norm
from multimodal.layers.pool import AttentionPool
from multimodal.layers.position import (
    ALiBi,
    LearnedPositionEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionEmbedding,
    apply_rotary,
)
from multimodal.layers.tower import TowerOutput, with_pooled_token
from multimodal.layers.transformer import Transformer, TransformerOutput

__all__ = [
    "ALiBi",
    "Attention",
    "AttentionPool",
    "AttentionOutput",
    "BlockCache",
    "BlockOutput",
    "FeedForward",
    "KVCache",
    "LearnedPositionEmbedding",
    "MoEFeedForward",
    "MoEStats",
    "RelativePositionBias",
    "RotaryEmbedding",
    "SinusoidalPositionEmbedding",
    "Transformer",
    "TowerOutput",
    "with_pooled_token",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerOutput",
    "apply_rotary",
    "attend",
    "banded_attend",
    "create_norm",
    "merge_padding",
    "position_mask",
]
