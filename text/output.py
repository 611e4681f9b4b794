"""Output type of the language models."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab_size)
    hidden: Tensor  # (B, T, dim), the final hidden states
    aux_loss: Tensor  # mixture-of-experts balance loss (0 without experts)
    # with return_attention=True, per block: self-attention (B, H, T, Tk) of the decoder (with a
    # soft prompt or a KV cache, Tk covers those keys too), its cross-attention (B, H, T, S),
    # and an encoder-decoder's encoder self-attention (B, H, S, S)
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None
    encoder_attentions: tuple[Tensor, ...] | None = None
