"""Output type of the language models."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab_size)
    hidden: Tensor  # (B, T, dim), the final hidden states
    aux_loss: Tensor  # mixture-of-experts balance loss (0 without experts)
