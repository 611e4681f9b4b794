"""Task heads over encoder token features (B, T, D): masked LM, next-sentence prediction,
sequence classification, token classification, extractive question answering; and frozen
feature extraction."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from text.pooling import pool_tokens


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the (tied) vocabulary projection.

    Args:
        dim: hidden width.
        vocab_size: output classes.
        tied_weight: the input embedding matrix (vocab_size, dim) to share, or None.
    """

    def __init__(self, dim: int, vocab_size: int, tied_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12))
        self.decoder = nn.Linear(dim, vocab_size)
        if tied_weight is not None:
            self.decoder.weight = tied_weight

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))  # (B, T, vocab)


class NextSentenceHead(nn.Module):
    """BERT's pooler (dense + tanh over [CLS]) and a 2-way classifier: does B follow A?"""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pooler = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.classifier = nn.Linear(dim, 2)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.classifier(self.pooler(hidden[:, 0]))  # (B, 2)


class SequenceClassificationHead(nn.Module):
    """Pool ("cls", "mean" or "eot") then dropout + linear classifier."""

    def __init__(
        self, dim: int, num_classes: int, *, pooling: str = "cls", dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return self.classifier(self.dropout(pool_tokens(hidden, mask, self.pooling)))  # (B, C)


class TokenClassificationHead(nn.Module):
    """A label per token (named entities, parts of speech): dropout + linear."""

    def __init__(self, dim: int, num_labels: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_labels)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.classifier(self.dropout(hidden))  # (B, T, labels)


class SpanLogits(NamedTuple):
    start: Tensor  # (B, T), -inf on padding
    end: Tensor  # (B, T), -inf on padding


class QuestionAnsweringHead(nn.Module):
    """Extractive QA: start and end logits of the answer span over the context tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.span = nn.Linear(dim, 2)

    def forward(self, hidden: Tensor, mask: Tensor) -> SpanLogits:
        start, end = self.span(hidden).float().unbind(-1)
        return SpanLogits(
            start.masked_fill(~mask, float("-inf")), end.masked_fill(~mask, float("-inf"))
        )


def best_spans(logits: SpanLogits, max_answer_length: int = 30) -> Tensor:
    """(B, 2) start and end index maximising start + end logits with start <= end <
    start + max_answer_length."""
    T = logits.start.shape[1]
    scores = logits.start[:, :, None] + logits.end[:, None, :]  # (B, start, end)
    offset = torch.arange(T, device=scores.device)
    span = offset[None, :] - offset[:, None]  # end - start
    valid = (span >= 0) & (span < max_answer_length)
    best = scores.masked_fill(~valid, float("-inf")).flatten(1).argmax(dim=1)
    return torch.stack([best // T, best % T], dim=1)


class TextFeatures(nn.Module):
    """A frozen encoder used as a feature extractor: pooled embeddings, no gradients, always in
    eval mode (no dropout), whatever mode the surrounding model is in.

    Args:
        encoder: an `EncoderLM`.
        pooling: "cls", "mean" or "eot".
        normalize: L2-normalise the embeddings.
    """

    def __init__(
        self, encoder: nn.Module, *, pooling: str = "mean", normalize: bool = False
    ) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.pooling = pooling
        self.normalize = normalize

    def train(self, mode: bool = True) -> TextFeatures:
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids, attention_mask=attention_mask).hidden
        pooled = pool_tokens(hidden, attention_mask, self.pooling)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
