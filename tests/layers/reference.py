"""Naive references the layer tests compare against, written from the definitions and sharing
no code with multimodal.layers."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, bias: Tensor | None):
    """softmax(Q K^T / sqrt(d) + bias) V with disallowed pairs at -inf.

    q (B, H, Tq, D); k, v (B, H_kv, Tk, D), query head h reading kv head h // (H / H_kv);
    allowed (B, Tq, Tk) bool; bias (H, Tq, Tk).
    """
    B, H, Tq, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(B, H, Tq, k.shape[2], dtype=torch.float64)
    for h in range(H):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        scores = q[:, h].double() @ kh.transpose(-1, -2) / math.sqrt(D)
        if bias is not None:
            scores = scores + bias[h].double()
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        w = torch.softmax(scores, dim=-1)
        weights[:, h] = w
        out[:, h] = w @ vh
    return out.float(), weights.float()


def brute_force_mask(
    batch: int,
    n_queries: int,
    n_keys: int,
    *,
    offset: int = 0,
    causal: bool = False,
    window: int | None = None,
    n_global: int = 0,
    padding: Tensor | None = None,
) -> Tensor:
    """allowed[b, i, j] by the rules, one pair at a time. Query i sits at position offset + i."""
    allowed = torch.zeros(batch, n_queries, n_keys, dtype=torch.bool)
    for b in range(batch):
        for i in range(n_queries):
            qi = offset + i
            for j in range(n_keys):
                ok = True
                if causal and j > qi:
                    ok = False
                if window is not None:
                    near = abs(qi - j) < window
                    is_global = j < n_global or (not causal and qi < n_global)
                    ok = ok and (near or is_global)
                if padding is not None and not padding[b, j]:
                    ok = False
                allowed[b, i, j] = ok
    return allowed


def naive_rope(x: Tensor, positions: Tensor, base: float = 10000.0, scaling: float = 1.0) -> Tensor:
    """Rotate feature pairs (x[j], x[j + D/2]) by angle (pos / scaling) * base^(-2j/D), as a
    multiplication of complex numbers. x (B, H, T, D)."""
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)
    angle = (positions.double() / scaling)[:, None] * theta  # (T, D/2)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double())
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).float()


def alibi_bias(slopes: list[float], n_queries: int, n_keys: int, offset: int = 0) -> Tensor:
    """bias[h, i, j] = -slope_h * |i + offset - j|."""
    bias = torch.zeros(len(slopes), n_queries, n_keys)
    for h, slope in enumerate(slopes):
        for i in range(n_queries):
            for j in range(n_keys):
                bias[h, i, j] = -slope * abs(i + offset - j)
    return bias


def t5_bucket_scalar(
    relative: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> int:
    """T5's bucket of one relative position (key - query), from the definition in the T5 paper
    and its reference code: half the buckets exact, the rest logarithmic up to max_distance."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if relative > 0:
            bucket += num_buckets
        n = abs(relative)
    else:
        n = max(-relative, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return bucket + min(large, num_buckets - 1)
