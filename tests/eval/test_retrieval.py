"""Chunked retrieval metrics against a brute-force reference over the full score matrix.

Exact cases use small integer-valued float64 features: every dot product is an exact integer,
so ties are real ties whatever the summation order.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multimodal.eval import retrieval
from multimodal.eval.retrieval import auto_chunk_size, retrieval_metrics, topk_retrieval


def brute_force_ranks(images, texts, text_image):
    """Pessimistic 1-based ranks by plain loops over the full (N_t, N_i) score matrix:
    (text -> image ranks, image -> text ranks, image query indices)."""
    scores = (texts @ images.T).tolist()
    targets = text_image.tolist()
    n_images = images.shape[0]
    t2i = []
    for t, row in enumerate(scores):
        correct = row[targets[t]]
        wrong = sum(1 for j in range(n_images) if j != targets[t] and row[j] >= correct)
        t2i.append(1 + wrong)
    i2t, queries = [], []
    for i in range(n_images):
        captions = [t for t in range(len(targets)) if targets[t] == i]
        if not captions:
            continue
        best = max(scores[t][i] for t in captions)
        wrong = sum(1 for t in range(len(targets)) if targets[t] != i and scores[t][i] >= best)
        i2t.append(1 + wrong)
        queries.append(i)
    return t2i, i2t, queries


def check_direction(result, ranks, queries, ks):
    assert result.ranks.tolist() == ranks
    assert result.query_index.tolist() == queries
    for k in ks:
        assert result.recall[k] == pytest.approx(sum(r <= k for r in ranks) / len(ranks))
    assert result.mean_rank == pytest.approx(sum(ranks) / len(ranks))
    assert result.median_rank == sorted(ranks)[(len(ranks) - 1) // 2]  # lower median


def integer_case(seed, n_images=9, n_texts=23, dim=4):
    """Integer features in {-2..2} (many ties); 0 to several captions per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(-2, 3, (n_images, dim), generator=g).double()
    texts = torch.randint(-2, 3, (n_texts, dim), generator=g).double()
    text_image = torch.randint(0, n_images - 2, (n_texts,), generator=g)  # last 2: no caption
    return images, texts, text_image


def test_hand_computed_ties_and_captionless_image():
    e = torch.eye(3, dtype=torch.float64)
    images = torch.stack([e[0], e[1], e[0], e[2]])  # image 2 duplicates image 0
    texts = torch.stack([e[0], e[1], e[0], e[0]])
    text_image = torch.tensor([0, 1, 2, 1])  # image 1 has two captions, image 3 none
    result = retrieval_metrics(images, texts, text_image, ks=(1, 2))
    # t0: [1,0,1,0] tie with image 2 -> 2; t1 -> 1; t2 ties with image 0 -> 2;
    # t3: correct score 0, images 0, 2 (1) and 3 (0 tie) -> 4
    assert result.text_to_image.ranks.tolist() == [2, 1, 2, 4]
    # image 0: best 1 (t0), wrong t2, t3 score 1 -> 3; image 1: best 1 (t1) -> 1; image 2 -> 3
    assert result.image_to_text.ranks.tolist() == [3, 1, 3]
    assert result.image_to_text.query_index.tolist() == [0, 1, 2]
    assert result.text_to_image.recall == {1: 0.25, 2: 0.75}
    assert result.image_to_text.recall == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3)}
    assert result.text_to_image.mean_rank == 2.25
    assert result.text_to_image.median_rank == 2
    assert result.to_dict()["image_to_text/mean_rank"] == pytest.approx(7 / 3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
@pytest.mark.parametrize("tie_tolerance", [None, 0.0])
def test_integer_features_with_ties_equal_brute_force(seed, chunk_size, tie_tolerance):
    images, texts, text_image = integer_case(seed)
    t2i, i2t, queries = brute_force_ranks(images, texts, text_image)
    ks = (1, 3, 5)
    result = retrieval_metrics(
        images, texts, text_image, ks=ks, chunk_size=chunk_size, tie_tolerance=tie_tolerance
    )
    check_direction(result.text_to_image, t2i, list(range(texts.shape[0])), ks)
    check_direction(result.image_to_text, i2t, queries, ks)
    assert result.tie_tolerance == 0.0  # integer scores: the blocks match the correct scores


def test_random_features_chunked_equals_unchunked_and_brute_force():
    n_images, n_texts, dim = 20, 50, 8
    images = F.normalize(torch.randn(n_images, dim, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(n_texts, dim, dtype=torch.float64), dim=-1)
    text_image = torch.randint(0, n_images, (n_texts,))
    t2i, i2t, queries = brute_force_ranks(images, texts, text_image)
    assert max(t2i) > 10 and min(t2i) == 1  # the ranks are spread, not trivial
    full = retrieval_metrics(images, texts, text_image, chunk_size=1000)
    for chunk_size in (3, 7):
        chunked = retrieval_metrics(images, texts, text_image, chunk_size=chunk_size)
        assert torch.equal(chunked.text_to_image.ranks, full.text_to_image.ranks)
        assert torch.equal(chunked.image_to_text.ranks, full.image_to_text.ranks)
        assert chunked.to_dict() == full.to_dict()
    check_direction(full.text_to_image, t2i, list(range(n_texts)), (1, 5, 10))
    check_direction(full.image_to_text, i2t, queries, (1, 5, 10))
    # fp32 and a tiny memory budget (blocks of a few rows) give the same ranks
    small = retrieval_metrics(images.float(), texts.float(), text_image, max_memory_bytes=3000)
    assert small.text_to_image.ranks.tolist() == t2i
    assert small.image_to_text.ranks.tolist() == i2t


def test_constant_embeddings_get_the_worst_ranks():
    n_images, n_texts, dim = 6, 15, 32
    vector = F.normalize(torch.randn(dim), dim=0)  # fp32: ties must survive rounding
    text_image = torch.arange(n_texts) % 5  # image 5 has no caption
    result = retrieval_metrics(
        vector.expand(n_images, dim), vector.expand(n_texts, dim), text_image, chunk_size=4
    )
    assert result.text_to_image.ranks.tolist() == [n_images] * n_texts
    assert result.image_to_text.ranks.tolist() == [n_texts - 3 + 1] * 5  # 3 captions each
    assert result.text_to_image.recall[1] == 0 and result.image_to_text.recall[10] == 0


def test_tie_tolerance_counts_gaps_below_it_as_ties():
    dim = 16
    text = torch.zeros(1, dim)
    text[0, 0] = 1.0
    images = torch.zeros(3, dim)
    images[:, 0] = torch.tensor([1.0, 1.0 - 2.4e-7, 1.0 - 1e-4])  # correct, near tie, clear loss
    images[1:, 1] = (1 - images[1:, 0] ** 2).sqrt()  # unit norm
    for wrong, expected in ((1, 2), (2, 1)):
        features = images[[0, wrong]]
        result = retrieval_metrics(features, text, torch.tensor([0]), tie_tolerance=5e-7)
        assert result.text_to_image.ranks.tolist() == [expected]
        exact = retrieval_metrics(features, text, torch.tensor([0]), tie_tolerance=0.0)
        assert exact.text_to_image.ranks.tolist() == [1]
        assert exact.tie_tolerance == 0.0 and result.tie_tolerance == 5e-7


def test_correct_scores_off_by_an_ulp_fall_back_to_the_tolerance(monkeypatch):
    # simulate a BLAS whose separate correct scores come out 1 ulp above the blocks' values:
    # with exact comparisons constant embeddings would then win every query
    compute = retrieval._correct_scores
    monkeypatch.setattr(
        retrieval,
        "_correct_scores",
        lambda *args: torch.nextafter(compute(*args), torch.tensor(math.inf)),
    )
    vector = torch.ones(1, 8) / math.sqrt(8)
    text_image = torch.tensor([0, 1, 2, 3])
    images, texts = vector.expand(4, 8), vector.expand(4, 8)
    exact = retrieval_metrics(images, texts, text_image, tie_tolerance=0.0)
    assert exact.text_to_image.ranks.tolist() == [1, 1, 1, 1]  # the failure being guarded
    result = retrieval_metrics(images, texts, text_image)
    assert result.tie_tolerance == pytest.approx(4 * torch.finfo(torch.float32).eps)
    assert result.text_to_image.ranks.tolist() == [4, 4, 4, 4]
    assert result.image_to_text.ranks.tolist() == [4, 4, 4, 4]


def test_perfect_model_ranks_one():
    n_images, dim = 12, 16
    images = F.normalize(torch.randn(n_images, dim), dim=-1)
    text_image = torch.arange(n_images).repeat_interleave(5)
    result = retrieval_metrics(images, images[text_image], text_image, chunk_size=5)
    for direction in (result.text_to_image, result.image_to_text):
        assert direction.ranks.eq(1).all()
        assert direction.recall == {1: 1.0, 5: 1.0, 10: 1.0}
        assert direction.mean_rank == direction.median_rank == 1.0


def test_half_precision_features_are_computed_in_fp32():
    images, texts, text_image = integer_case(0)
    reference = retrieval_metrics(images.float(), texts.float(), text_image)
    for dtype in (torch.float16, torch.bfloat16):
        result = retrieval_metrics(images.to(dtype), texts.to(dtype), text_image, chunk_size=4)
        assert result.to_dict() == reference.to_dict()


@pytest.mark.parametrize("chunk_size", [None, 3, 7])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_topk_retrieval_equals_full_topk(chunk_size, k):
    queries = F.normalize(torch.randn(17, 8), dim=-1)
    gallery = F.normalize(torch.randn(40, 8), dim=-1)
    values, index = topk_retrieval(queries, gallery, k, chunk_size=chunk_size)
    expected_values, expected_index = (queries @ gallery.T).topk(k, dim=1)
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(index, expected_index)  # random scores: no ties
    # features straight from a model: no autograd graph is built
    assert not topk_retrieval(queries.requires_grad_(), gallery, k)[0].requires_grad


def test_rerank_with_ground_truth_scorer_moves_correct_items_in_top_k_to_rank_one():
    n_images, n_texts, dim, k = 30, 90, 4, 5
    images = F.normalize(torch.randn(n_images, dim, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(n_texts, dim, dtype=torch.float64), dim=-1)
    text_image = torch.randint(0, n_images, (n_texts,))
    t2i, i2t, _ = brute_force_ranks(images, texts, text_image)
    assert any(1 < r <= k for r in t2i) and any(r > k for r in t2i)
    assert any(1 < r <= k for r in i2t) and any(r > k for r in i2t)
    calls = []

    def oracle(image_index, text_index):
        calls.append(image_index.shape)
        return (text_image[text_index] == image_index).double()

    result = retrieval_metrics(
        images, texts, text_image, chunk_size=7, rerank=oracle, rerank_k=k, rerank_batch=4
    )
    assert result.text_to_image.ranks.tolist() == [1 if r <= k else r for r in t2i]
    assert result.image_to_text.ranks.tolist() == [1 if r <= k else r for r in i2t]
    assert all(shape[0] <= 4 and shape[1] == k for shape in calls)

    # a scorer that cannot tell the candidates apart: ties count against the model, so a text
    # whose image was in the top k ends at rank k (its k - 1 wrong candidates tie with it)
    flat = retrieval_metrics(
        images, texts, text_image, rerank=lambda i, t: torch.zeros(i.shape), rerank_k=k
    )
    assert flat.text_to_image.ranks.tolist() == [k if r <= k else r for r in t2i]


def test_auto_chunk_size_fills_the_budget():
    for dim, itemsize, budget in [(512, 4, 512 * 2**20), (4, 8, 3000), (768, 2, 10**6)]:
        c = auto_chunk_size(dim, itemsize, budget)
        used = [side * side * (itemsize + 5) + 2 * side * dim * itemsize for side in (c, c + 1)]
        assert used[0] <= budget < used[1]


def test_invalid_inputs_raise_clear_errors():
    images, texts = torch.randn(4, 8), torch.randn(6, 8)
    text_image = torch.tensor([0, 0, 1, 2, 3, 3])
    cases = [
        ((images, torch.randn(6, 7), text_image), {}, "same feature dim"),
        ((images[0], texts, text_image), {}, "2-D tensor"),
        ((images[:0], texts, text_image), {}, "non-empty"),
        ((images, texts, text_image[:5]), {}, "one entry per text"),
        ((images, texts, text_image.float()), {}, "integer tensor"),
        ((images, texts, text_image + 1), {}, r"\[0, 4\)"),
        ((images, texts, text_image - 1), {}, r"\[0, 4\)"),
        ((images.int(), texts, text_image), {}, "floating point"),
        ((images, texts, text_image), {"ks": (0,)}, "ks"),
        ((images, texts, text_image), {"chunk_size": 0}, "chunk_size"),
        ((images, texts, text_image), {"tie_tolerance": -1.0}, "tie_tolerance"),
        ((images.index_fill(0, torch.tensor([3]), math.nan), texts, text_image), {}, "finite"),
        ((images, texts, text_image), {"rerank": lambda i, t: torch.zeros(3)}, "rerank must"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            retrieval_metrics(*args, **kwargs)
    with pytest.raises(ValueError, match="gallery size"):
        topk_retrieval(texts, images, 5)
    with pytest.raises(ValueError, match="same feature dim"):
        topk_retrieval(texts, images[:, :3], 1)
