"""BERT token masking and T5 span corruption: statistics, invariants and determinism."""

from __future__ import annotations

import pytest
import torch

from text.masking import mask_tokens, span_corruption

VOCAB, MASK = 1000, 4
SPECIALS = (0, 1, 2, 3, MASK)  # pad, cls, sep, ... never in the random body below


def _batch(n_rows: int = 200, n_cols: int = 1000, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), VOCAB, (n_rows, n_cols), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # cls ... sep
    ids[::2, -100:] = 0  # padding on every other row
    special = torch.isin(ids, torch.tensor(SPECIALS))
    return ids, special


def test_mask_tokens_statistics():
    ids, special = _batch()  # 200k tokens
    g = torch.Generator().manual_seed(1)
    inputs, labels = mask_tokens(
        ids, mask_id=MASK, vocab_size=VOCAB, special_mask=special, generator=g
    )
    assert inputs.shape == labels.shape == ids.shape
    assert inputs.dtype == labels.dtype == ids.dtype
    selected = labels != -100
    assert not (selected & special).any()  # specials are never selected
    assert torch.equal(labels[selected], ids[selected])  # labels hold the original ids
    assert torch.equal(inputs[~selected], ids[~selected])  # the rest is untouched
    assert selected.sum() / (~special).sum() == pytest.approx(0.15, abs=0.005)
    n = selected.sum()
    masked = inputs[selected] == MASK
    kept = inputs[selected] == ids[selected]
    replaced = ~masked & ~kept
    assert masked.sum() / n == pytest.approx(0.8, abs=0.015)
    # a random replacement equals the original with probability 1 / VOCAB
    assert replaced.sum() / n == pytest.approx(0.1 * (1 - 1 / VOCAB), abs=0.015)
    assert kept.sum() / n == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.015)
    random_ids = inputs[selected][replaced]
    assert ((random_ids >= 0) & (random_ids < VOCAB)).all()


def test_mask_tokens_generator_and_probability_edges():
    ids, special = _batch(8, 64)
    kwargs = dict(mask_id=MASK, vocab_size=VOCAB, special_mask=special)
    a = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(3))
    c = mask_tokens(ids, **kwargs, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    inputs, labels = mask_tokens(ids, **kwargs, probability=0.0)
    assert torch.equal(inputs, ids) and (labels == -100).all()
    _, labels = mask_tokens(ids, **kwargs, probability=1.0)
    assert torch.equal(labels != -100, ~special)
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, **kwargs, probability=1.5)
    with pytest.raises(ValueError, match="special_mask"):
        mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_mask=special[:, 1:])


SENTINEL_0 = 100_000
SENTINELS = list(range(SENTINEL_0, SENTINEL_0 + 2000))


def _reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """Substitute every sentinel in the input by the span that follows it in the target."""
    sentinels = set(SENTINELS)
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets:
        if token in sentinels:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    out: list[int] = []
    for token in inputs:
        out += spans[token] if token in sentinels else [token]
    return out


@pytest.mark.parametrize("length", [2, 3, 7, 20, 101, 512])
@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.5, 1.0), (0.3, 8.0)])
def test_span_corruption_reconstructs_the_input(length, density, mean_span):
    ids = list(range(100, 100 + length))
    g = torch.Generator().manual_seed(length)
    inputs, targets = span_corruption(
        ids, sentinel_ids=SENTINELS, noise_density=density, mean_span_length=mean_span, generator=g
    )
    assert _reconstruct(inputs, targets) == ids
    n_spans = sum(t in set(SENTINELS) for t in targets)
    assert n_spans >= 1 and targets[0] == SENTINELS[0]
    # sentinels appear in order, once each, in both input and target
    assert [t for t in inputs if t >= SENTINEL_0] == SENTINELS[:n_spans]
    assert [t for t in targets if t >= SENTINEL_0] == SENTINELS[:n_spans]


def test_span_corruption_noise_fraction_and_span_length():
    ids = torch.arange(100, 100 + 10_000)  # a tensor input
    inputs, targets = span_corruption(ids, sentinel_ids=SENTINELS, noise_density=0.15)
    n_spans = sum(t >= SENTINEL_0 for t in targets)
    n_noise = len(targets) - n_spans
    assert n_noise / len(ids) == pytest.approx(0.15, abs=0.005)
    assert n_noise / n_spans == pytest.approx(3.0, rel=0.05)
    assert len(inputs) == len(ids) - n_noise + n_spans


def test_span_corruption_deterministic_and_errors():
    ids = list(range(100, 400))

    def run(seed: int) -> tuple[list[int], list[int]]:
        g = torch.Generator().manual_seed(seed)
        return span_corruption(ids, sentinel_ids=SENTINELS, generator=g)

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert span_corruption([7], sentinel_ids=SENTINELS) == ([7], [])
    with pytest.raises(ValueError, match="sentinel_ids"):
        span_corruption(ids, sentinel_ids=SENTINELS[:3])  # 300 * 0.15 / 3 = 15 spans
    with pytest.raises(ValueError, match="noise_density"):
        span_corruption(ids, sentinel_ids=SENTINELS, noise_density=1.0)
    with pytest.raises(ValueError, match="mean_span_length"):
        span_corruption(ids, sentinel_ids=SENTINELS, mean_span_length=0.5)
    with pytest.raises(ValueError, match="1-D"):
        span_corruption(torch.zeros(2, 3, dtype=torch.long), sentinel_ids=SENTINELS)
