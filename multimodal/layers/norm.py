"""Normalisation layers chosen by name, so that configs stay plain strings."""

from __future__ import annotations

from torch import nn

NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def create_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """Build the norm called `kind` ("layernorm" or "rmsnorm") over the last `dim` features."""
    if kind not in NORMS:
        raise ValueError(f"norm={kind!r} is not a known norm; choose one of {sorted(NORMS)}")
    return NORMS[kind](dim, eps=eps)
