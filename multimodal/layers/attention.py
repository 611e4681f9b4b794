"""One attention module for every tower: self- or cross-attention, MHA/MQA/GQA, causal,
padding, sliding-window and global-token masks, rotary or relative position biases, KV cache.

The kernel (`attend`) is apart from the projections: it calls
`torch.nn.functional.scaled_dot_product_attention` and materialises the (Tq, Tk) weights only
when they are asked for. Sliding-window self-attention over long sequences goes through
`banded_attend`, whose cost grows with T * window instead of T * T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal.layers.kv_cache import KVCache
from multimodal.layers.masks import merge_padding, position_mask
from multimodal.layers.position import apply_rotary

BAND_BLOCK = 64  # query block of banded sliding-window attention

# maps relative positions (key - query) of any shape (...) to a score bias (H, ...)
PositionBias = Callable[[Tensor], Tensor]


class KVPrefix(NamedTuple):
    """Learned keys and values every query of a self-attention layer may attend to (prefix
    tuning). They are not rotated by RoPE, get zero relative-position bias and are visible
    through causal, window and padding masks; they are never stored in a KV cache.

    gate None: one softmax over prefix and token keys (Li & Liang 2021). A gate (0-d tensor):
    the prefix gets its own softmax and its output, scaled by the gate, is added to the
    unchanged token attention (LLaMA-Adapter's zero-init attention: gate 0 = no change).
    """

    keys: Tensor  # (H_kv, P, D)
    values: Tensor  # (H_kv, P, D)
    gate: Tensor | None


class AttentionOutput(NamedTuple):
    output: Tensor  # (B, Tq, dim)
    weights: Tensor | None  # (B, H, Tq, Tk), only when return_attention=True


def check_attention_args(
    dim: int,
    n_heads: int,
    n_kv_heads: int | None,
    window: int | None,
    n_global_tokens: int,
    *,
    causal: bool = False,
    cross: bool = False,
    prefix: str = "",
) -> None:
    """Raise ValueError naming the field when heads, window or global tokens do not fit."""
    if n_heads <= 0 or dim % n_heads:
        raise ValueError(f"{prefix}n_heads={n_heads} must be > 0 and divide dim={dim}")
    if n_kv_heads is not None and (n_kv_heads <= 0 or n_heads % n_kv_heads):
        raise ValueError(
            f"{prefix}n_kv_heads={n_kv_heads} must be > 0 and divide n_heads={n_heads} "
            "(1 = multi-query, n_heads = multi-head, a divisor = grouped-query)"
        )
    if window is not None and window <= 0:
        raise ValueError(f"{prefix}window={window} must be a positive number of tokens or None")
    if n_global_tokens < 0:
        raise ValueError(f"{prefix}n_global_tokens={n_global_tokens} must be >= 0")
    if n_global_tokens and window is None:
        raise ValueError(
            f"{prefix}n_global_tokens={n_global_tokens} needs a sliding window: without one "
            "every token is already global"
        )
    if cross and (causal or window is not None):
        raise ValueError(f"{prefix}cross-attention cannot be causal or windowed")


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T / sqrt(D) + bias, masked) v.

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with H_kv dividing H (grouped-query attention:
    query head h reads key/value head h // (H / H_kv)). mask: bool, broadcastable to
    (B, H, Tq, Tk), True = may attend. bias: float, broadcastable likewise. is_causal: a
    top-left causal mask with no tensor built (only without mask and bias). A query that may
    attend to no key gets zeros. Returns the output (B, H, Tq, D) and, when asked, the weights.
    """
    if is_causal and (mask is not None or bias is not None):
        raise ValueError("is_causal=True takes no mask or bias: fold causality into the mask")
    if return_weights:
        return _explicit_attention(q, k, v, mask, bias, is_causal, dropout_p)
    attn_mask = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out, None


def _explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    is_causal: bool,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """The same computation with the weights materialised in fp32, for visualisation."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1).nan_to_num(0.0)  # rows with no visible key -> zeros
    out = F.dropout(weights, dropout_p) @ v.float()
    return out.to(q.dtype), weights


def banded_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool,
    n_global_tokens: int = 0,
    key_padding_mask: Tensor | None = None,
    position_bias: PositionBias | None = None,
    dropout_p: float = 0.0,
    block: int | None = None,
) -> Tensor:
    """Sliding-window self-attention of q, k, v (B, H, T, D) computed block by block.

    Queries are cut into blocks of `block` tokens (default 64: smaller blocks waste less of
    the band on masked pairs, larger ones copy fewer overlapping key windows); each block
    attends to the keys of its own span plus `window - 1` on the side(s) the mask allows, so
    time and memory grow with T * (block + 2 * window) instead of T * T. Global tokens (the
    first `n_global_tokens`) are added as keys to every block and, without causal masking,
    attend to all keys.
    Equal to `attend` with the dense `position_mask`.
    """
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    c = block or BAND_BLOCK
    left, right = window - 1, 0 if causal else window - 1
    n_blocks = -(-T // c)
    pad = n_blocks * c - T
    span = c + left + right
    device = q.device

    def windows(x: Tensor) -> Tensor:  # (B, H_kv, T, D) -> (B, H_kv, n_blocks, span, D)
        x = F.pad(x, (0, 0, left, pad + right))
        return x.unfold(2, span, c).transpose(-1, -2)

    starts = torch.arange(n_blocks, device=device)[:, None] * c
    query_pos = starts + torch.arange(c, device=device)  # (n_blocks, c)
    key_pos = starts - left + torch.arange(span, device=device)  # (n_blocks, span)
    mask = position_mask(query_pos, key_pos, causal=causal, window=window)  # (nb, c, span)
    # keys outside the sequence, and global keys (added below once), are not in the windows
    in_window = (key_pos >= n_global_tokens) & (key_pos < T)
    mask = (mask & in_window[:, None, :])[None]  # (1, nb, c, span)
    if key_padding_mask is not None:
        padded = F.pad(key_padding_mask, (left, pad + right)).unfold(1, span, c)
        mask = mask & padded[:, :, None, :]  # (B, nb, c, span)
    kw, vw = windows(k), windows(v)
    bias = None
    if position_bias is not None:
        # key - query inside a block's frame is the same for every block: (c, span)
        frame = torch.arange(span, device=device) - left - torch.arange(c, device=device)[:, None]
        bias = position_bias(frame)[:, None]  # (H, 1, c, span)
    if n_global_tokens:
        g = n_global_tokens
        global_pos = torch.arange(g, device=device)
        kw = torch.cat([k[:, :, None, :g].expand(B, H_kv, n_blocks, g, D), kw], dim=3)
        vw = torch.cat([v[:, :, None, :g].expand(B, H_kv, n_blocks, g, D), vw], dim=3)
        global_mask = position_mask(query_pos, global_pos, causal=causal)[None]  # (1, nb, c, g)
        if key_padding_mask is not None:
            global_mask = global_mask & key_padding_mask[:, None, None, :g]
        mask = torch.cat([global_mask.expand(mask.shape[0], -1, -1, -1), mask], dim=-1)
        if bias is not None:
            global_bias = position_bias(global_pos - query_pos[..., None])  # (H, nb, c, g)
            bias = torch.cat([global_bias, bias.expand(-1, n_blocks, -1, -1)], dim=-1)
    span = kw.shape[3]

    # fold the blocks into the batch: (B * n_blocks, heads, tokens, D)
    def fold(x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(B * n_blocks, x.shape[1], x.shape[3], D)

    qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n_blocks, c, D)
    mask = mask.expand(B, n_blocks, c, span).reshape(B * n_blocks, 1, c, span)
    if bias is not None:
        bias = (
            bias.transpose(0, 1).expand(B, n_blocks, H, c, span).reshape(B * n_blocks, H, c, span)
        )
    out, _ = attend(fold(qb), fold(kw), fold(vw), mask=mask, bias=bias, dropout_p=dropout_p)
    out = out.view(B, n_blocks, H, c, D).transpose(1, 2).reshape(B, H, n_blocks * c, D)[:, :, :T]
    if n_global_tokens and not causal:
        # global queries see every key
        g = n_global_tokens
        global_padding = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        global_bias = None
        if position_bias is not None:
            positions = torch.arange(T, device=device)
            global_bias = position_bias(positions - positions[:g, None])  # (H, g, T)
        global_out, _ = attend(
            q[:, :, :g], k, v, mask=global_padding, bias=global_bias, dropout_p=dropout_p
        )
        out = torch.cat([global_out, out[:, :, g:]], dim=2)
    return out


class Attention(nn.Module):
    """Multi-head attention with the variants as configuration values.

    Args:
        dim: width of the query sequence (and of the output).
        n_heads: query heads; head size is dim // n_heads.
        n_kv_heads: key/value heads: None or n_heads = MHA, 1 = MQA, a divisor = GQA.
        cross: keys and values come from a context sequence (cross-attention).
        context_dim: width of the context sequence (default: dim).
        causal: a query sees only keys at its position or before.
        window: sliding window: a query sees only keys at distance < window.
        n_global_tokens: with a window, the first tokens are visible to (and, without causal
            masking, see) every token.
        bias: biases on the projections.
        dropout: dropout on the attention weights; proj_dropout: on the output.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        cross: bool = False,
        context_dim: int | None = None,
        causal: bool = False,
        window: int | None = None,
        n_global_tokens: int = 0,
        bias: bool = True,
        dropout: float = 0.0,
        proj_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_attention_args(
            dim, n_heads, n_kv_heads, window, n_global_tokens, causal=causal, cross=cross
        )
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.cross = cross
        self.causal = causal
        self.window = window
        self.n_global_tokens = n_global_tokens
        self.dropout = dropout
        kv_width = 2 * self.n_kv_heads * self.head_dim
        if cross:
            self.qkv = None
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(context_dim or dim, kv_width, bias=bias)
        else:  # one fused projection for queries, keys and values
            self.qkv = nn.Linear(dim, dim + kv_width, bias=bias)
            self.q = self.kv = None
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_dropout = nn.Dropout(proj_dropout)
        # prefix tuning (multimodal.adapt.prefix): a module returning a `KVPrefix`
        self.kv_prefix: nn.Module | None = None

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        position_bias: PositionBias | None = None,
        cache: KVCache | None = None,
        return_attention: bool = False,
    ) -> AttentionOutput:
        """Attend from x (B, T, dim) to itself, or to `context` (B, S, context_dim).

        key_padding_mask: (B, Tk) bool, True = real token, over all keys (the cached ones
        included, or the context's). rope: (cos, sin) tables (T, head_dim) for x's positions.
        position_bias: relative bias function (ALiBi, T5). cache: this layer's KV cache.
        With a `kv_prefix` (ungated) the returned weights cover (B, H, T, P + Tk), prefix first;
        gated, they are those of the token softmax.
        """
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        offset = 0
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context sequence (B, S, context_dim)")
            q = self.q(x).view(B, T, H, D).transpose(1, 2)
            if cache is not None and cache.length:  # the context's keys, computed once
                k, v = cache.keys_values()
            else:
                kv = self.kv(context).view(B, context.shape[1], 2, H_kv, D)
                k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H_kv, S, D) each
                if cache is not None:
                    cache.append(k, v)
        else:
            q, k, v = self.qkv(x).split([H * D, H_kv * D, H_kv * D], dim=-1)
            q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = k.view(B, T, H_kv, D).transpose(1, 2)  # (B, H_kv, T, D)
            v = v.view(B, T, H_kv, D).transpose(1, 2)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                offset = cache.length
                k, v = cache.append(k, v)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        prefix: KVPrefix | None = None
        if self.kv_prefix is not None:
            if self.cross:
                raise ValueError("a KV prefix applies to self-attention only")
            prefix = self.kv_prefix()
        joint = prefix is not None and prefix.gate is None  # prefix keys in the same softmax
        if self.cross:
            mask = merge_padding(None, key_padding_mask)
            out, weights = attend(
                q, k, v, mask=mask, dropout_p=dropout_p, return_weights=return_attention
            )
        elif (
            self.window is not None
            and offset == 0
            and not return_attention
            and 2 * max(self.window, 64) <= T
            and not joint
        ):
            out = banded_attend(
                q,
                k,
                v,
                window=self.window,
                causal=self.causal,
                n_global_tokens=self.n_global_tokens,
                key_padding_mask=key_padding_mask,
                position_bias=position_bias,
                dropout_p=dropout_p,
            )
        elif (
            self.causal
            and self.window is None
            and offset == 0
            and key_padding_mask is None
            and position_bias is None
            and not joint
        ):
            out, weights = attend(
                q, k, v, is_causal=True, dropout_p=dropout_p, return_weights=return_attention
            )
        else:
            query_pos = torch.arange(offset, offset + T, device=x.device)
            key_pos = torch.arange(k.shape[2], device=x.device)
            mask = None
            if self.window is not None or (self.causal and T > 1):
                mask = position_mask(
                    query_pos,
                    key_pos,
                    causal=self.causal,
                    window=self.window,
                    n_global_tokens=self.n_global_tokens,
                )
            bias = None
            if position_bias is not None:
                bias = position_bias(key_pos - query_pos[:, None])  # (H, T, Tk)
            if joint and prefix is not None:
                k, v, mask, bias, key_padding_mask = _prepend_prefix(
                    prefix, k, v, mask, bias, key_padding_mask
                )
            out, weights = attend(
                q,
                k,
                v,
                mask=merge_padding(mask, key_padding_mask),
                bias=bias,
                dropout_p=dropout_p,
                return_weights=return_attention,
            )
        if prefix is not None and prefix.gate is not None:  # the prefix's own softmax, gated
            pk, pv = (t.to(q.dtype).expand(B, -1, -1, -1) for t in prefix[:2])
            prefix_out, _ = attend(q, pk, pv, dropout_p=dropout_p)
            out = out + prefix.gate.to(out.dtype) * prefix_out
        out = out.transpose(1, 2).reshape(B, T, H * D)
        return AttentionOutput(self.proj_dropout(self.proj(out)), weights)


def _prepend_prefix(
    prefix: KVPrefix,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    bias: Tensor | None,
    key_padding_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Put the P prefix keys/values (H_kv, P, D) in front of k, v (B, H_kv, Tk, D); every
    query sees them (mask and padding True) with zero position bias."""
    B, P = k.shape[0], prefix.keys.shape[1]
    k = torch.cat([prefix.keys.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([prefix.values.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
    if mask is not None:  # (Tq, Tk)
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], P), mask], dim=-1)
    if bias is not None:  # (H, Tq, Tk)
        bias = torch.cat([bias.new_zeros(*bias.shape[:-1], P), bias], dim=-1)
    if key_padding_mask is not None:  # (B, Tk)
        key_padding_mask = torch.cat([key_padding_mask.new_ones(B, P), key_padding_mask], dim=-1)
    return k, v, mask, bias, key_padding_mask
