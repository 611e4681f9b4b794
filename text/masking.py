"""Corruption for self-supervised text objectives: BERT's token masking and T5's span corruption.

Pure functions on token ids (no Lightning, no tokenizer): the datamodules call them in their
collate functions, so the corruption is drawn afresh every time a batch is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label value that cross-entropy ignores


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_mask: Tensor,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption of a batch of token ids.

    Each token whose `special_mask` is False is selected with `probability` (padding, [CLS],
    [SEP] and other specials must be marked True and are never selected). Of the selected
    tokens 80% are replaced by `mask_id`, 10% by a random id and 10% are left unchanged. The
    random id is drawn uniformly from [0, vocab_size), special ids included, as BERT did: the
    chance of drawing a special is small for real vocabularies and excluding them would need
    the tokenizer here. A random id may equal the original one.

    Args:
        input_ids: (...) integer ids, any shape (typically (B, T)).
        mask_id: id of the mask token.
        vocab_size: random replacements are drawn from [0, vocab_size).
        special_mask: bool tensor of the shape of `input_ids`, True where a token must never
            be selected.
        probability: fraction of the non-special tokens selected.
        generator: random source (on the device of `input_ids`); torch's default when None.

    Returns:
        (inputs, labels): the corrupted ids, and the original id at selected positions and
        -100 everywhere else, both of the shape and dtype of `input_ids`.
    """
    if not 0 <= probability <= 1:
        raise ValueError(f"probability={probability} must be in [0, 1]")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be > 0")
    if special_mask.shape != input_ids.shape or special_mask.dtype != torch.bool:
        raise ValueError(
            f"special_mask must be a bool tensor of shape {tuple(input_ids.shape)}, got "
            f"{special_mask.dtype} of shape {tuple(special_mask.shape)}"
        )
    shape, device = input_ids.shape, input_ids.device
    selected = (torch.rand(shape, generator=generator, device=device) < probability) & ~special_mask
    action = torch.rand(shape, generator=generator, device=device)  # 80% mask, 10% random, 10% keep
    random_ids = torch.randint(
        vocab_size, shape, generator=generator, device=device, dtype=input_ids.dtype
    )
    inputs = torch.where(selected & (action < 0.8), mask_id, input_ids)
    inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    labels = torch.where(selected, input_ids, IGNORE_INDEX)
    return inputs, labels


def _random_segmentation(
    n_items: int, n_segments: int, generator: torch.Generator | None
) -> list[int]:
    """Lengths of a uniformly random split of `n_items` into `n_segments` non-empty parts."""
    # choose the n_segments - 1 cut points among the n_items - 1 gaps between items
    cuts = torch.randperm(n_items - 1, generator=generator)[: n_segments - 1].sort().values + 1
    bounds = [0, *cuts.tolist(), n_items]
    return [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def span_corruption(
    ids: Sequence[int] | Tensor,
    *,
    sentinel_ids: Sequence[int],
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[int]]:
    """T5's span corruption of one unpadded sequence.

    As in T5's `random_spans_noise_mask`: round(len * noise_density) noise tokens (at least 1
    and at most len - 1) are split into round(noise / mean_span_length) spans (at least 1),
    the clean tokens into as many spans, and the two kinds alternate starting with a clean
    span and ending with a noise span, with span lengths drawn uniformly at random. Each noise
    span is replaced in the input by one sentinel (sentinel_ids[0], [1], ... in order); the
    target lists every sentinel followed by the span it replaced. No end-of-sequence token is
    added to either.
    Sequences shorter than 2 tokens are returned unchanged with an empty target.

    Args:
        ids: 1-D token ids without padding (a list or a tensor).
        sentinel_ids: ids of the sentinel tokens, one per span at least.
        noise_density: fraction of the tokens to corrupt, in (0, 1).
        mean_span_length: mean length of a corrupted span, >= 1.
        generator: CPU random source; torch's default when None.

    Returns:
        (inputs, targets) as lists of ids.
    """
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density={noise_density} must be in (0, 1)")
    if mean_span_length < 1:
        raise ValueError(f"mean_span_length={mean_span_length} must be >= 1")
    length = len(ids)
    if length < 2:
        return ids, []
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    n_spans = min(n_spans, n_noise, length - n_noise)  # every span needs at least one token
    if n_spans > len(sentinel_ids):
        raise ValueError(
            f"span_corruption needs {n_spans} sentinel_ids for {length} tokens "
            f"(noise_density={noise_density}, mean_span_length={mean_span_length}), "
            f"got {len(sentinel_ids)}"
        )
    noise_lengths = _random_segmentation(n_noise, n_spans, generator)
    clean_lengths = _random_segmentation(length - n_noise, n_spans, generator)
    inputs: list[int] = []
    targets: list[int] = []
    start = 0
    for sentinel, clean, noise in zip(sentinel_ids, clean_lengths, noise_lengths, strict=False):
        inputs += ids[start : start + clean]
        start += clean
        inputs.append(sentinel)
        targets += [sentinel, *ids[start : start + noise]]
        start += noise
    return inputs, targets
