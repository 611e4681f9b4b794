"""Image-text retrieval metrics (Recall@K, mean and median rank) computed block by block, so
that the (N_images, N_texts) similarity matrix is never held in memory.

Written by hand: torchmetrics' retrieval metrics take every (query, candidate) score as input
(the full matrix) and break ties by sort order; here the scores are computed and reduced in
blocks and ties count against the model.

Ranks are 1-based and pessimistic about ties:

- text -> image: rank = 1 + number of WRONG images whose score is >= the score of the text's
  image.
- image -> text: rank = 1 + number of WRONG texts whose score is >= the best score among the
  image's own captions. Images without captions are not queries (they stay in the gallery of
  text -> image).

A model with constant embeddings therefore gets the worst possible ranks, not the best.
"Score >= correct score" is exact when the correct scores, computed before the pass over
the blocks with the same matmul kernel, equal the blocks' own values bit for bit (checked
during the pass; true on CPU in practice). Where they do not (another BLAS path, e.g. on GPU or
for tiny shapes: a few ulp), a tie could turn into a win, so the pass is run again comparing
"score >= correct score - tolerance" with tolerance 4 * eps(dtype) * max|image| * max|text|
(4.8e-7 for unit fp32 features, 4 ulp of a score of 1; 8.9e-16 in fp64): scores that close to
the correct one count as ties. `tie_tolerance` fixes the margin instead (0.0: always exact
comparisons, one pass); the result records the margin used.

Scores are computed in the features' dtype (fp32 or fp64); fp16 / bf16 features are cast to
fp32 block by block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# rerank(image_index (Q, k), text_index (Q, k)) -> scores (Q, k); higher = better match
Reranker = Callable[[Tensor, Tensor], Tensor]
_GROUP = 512  # texts per matmul computing the correct scores (>= 64: the blocks' BLAS path)


@dataclass(frozen=True)
class DirectionResult:
    """Metrics of one retrieval direction.

    Attributes:
        recall: {K: fraction in [0, 1] of queries whose rank is <= K}.
        mean_rank: mean of the 1-based ranks.
        median_rank: lower median of the ranks (an integer rank, as `torch.median`).
        ranks: (Q,) long, the 1-based rank of each query (for Recall@K curves).
        query_index: (Q,) long, the index of each query among the images or the texts.
    """

    recall: dict[int, float]
    mean_rank: float
    median_rank: float
    ranks: Tensor
    query_index: Tensor


@dataclass(frozen=True)
class RetrievalResult:
    """Both directions; `to_dict()` flattens the scalars for loggers and reports."""

    image_to_text: DirectionResult
    text_to_image: DirectionResult
    tie_tolerance: float  # the margin applied (see the module docstring)

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, res in (
            ("image_to_text", self.image_to_text),
            ("text_to_image", self.text_to_image),
        ):
            for k, value in res.recall.items():
                out[f"{name}/recall@{k}"] = value
            out[f"{name}/mean_rank"] = res.mean_rank
            out[f"{name}/median_rank"] = res.median_rank
        return out


def _compute_dtype(*features: Tensor) -> torch.dtype:
    dtype = torch.promote_types(features[0].dtype, features[1].dtype)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_features(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got {_describe(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def _check_pair(query: Tensor, gallery: Tensor, names: tuple[str, str]) -> None:
    _check_features(names[0], query)
    _check_features(names[1], gallery)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same feature dim, got "
            f"{query.shape[1]} and {gallery.shape[1]}"
        )
    if query.device != gallery.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on the same device")


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def auto_chunk_size(dim: int, itemsize: int, max_memory_bytes: int) -> int:
    """Side c of the square (c, c) score blocks so that one block, its boolean comparison mask,
    the int32 copy of the mask that torch's sum makes, and the two (c, D) feature chunks fit in
    `max_memory_bytes`: c^2 * (itemsize + 1 + 4) + 2 * c * D * itemsize <= budget."""
    if max_memory_bytes < 1:
        raise ValueError(f"max_memory_bytes must be positive, got {max_memory_bytes}")
    a, b = itemsize + 5, 2 * dim * itemsize
    c = int((-b + math.sqrt(b * b + 4 * a * max_memory_bytes)) / (2 * a))
    return max(c, 1)


def _bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """Split range(n) into ceil(n / chunk) nearly equal pieces (none much smaller than chunk)."""
    pieces = -(-n // chunk)
    edges = [i * n // pieces for i in range(pieces + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _max_norm(name: str, x: Tensor, chunk: int, dtype: torch.dtype) -> float:
    """Largest row norm; raises on NaN / inf features (NaN scores would compare as wins)."""
    norm = 0.0
    for a, b in _bounds(x.shape[0], chunk):
        chunk_norm = torch.linalg.vector_norm(x[a:b].to(dtype), dim=-1).max().item()
        if not math.isfinite(chunk_norm):
            raise ValueError(f"{name} must be finite, found NaN or inf")
        norm = max(norm, chunk_norm)
    return norm


@torch.no_grad()
def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_image: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    max_memory_bytes: int = 512 * 2**20,
    tie_tolerance: float | None = None,
    rerank: Reranker | None = None,
    rerank_k: int = 10,
    rerank_batch: int = 256,
) -> RetrievalResult:
    """Image -> text and text -> image Recall@K (fractions in [0, 1]), mean / median rank and
    the per-query ranks, with the pessimistic tie rule of the module docstring.

    One pass over (text chunk, image chunk) blocks of the score matrix serves both directions:
    each block's scores are compared with the texts' correct scores (row counts, text -> image)
    and with the images' correct scores (column counts, image -> text). The correct scores are
    computed first: the dot product of each text with its image, and for each image the max
    of that over its captions (a segment max); if they do not match the blocks' own values bit
    for bit, the pass runs again with a tolerance (module docstring). Peak extra memory is about
    `max_memory_bytes` (plus O(N) for the counts). Re-ranking computes the top-k of the queries
    it re-ranks with `topk_retrieval` (another pass over the gallery for those queries).

    Optional re-ranking (e.g. by an image-text matching head): for each query whose embedding
    rank is <= `rerank_k`, the top `rerank_k` candidates by embedding score are re-scored with
    `rerank(image_index, text_index)` (both (Q, rerank_k) long, called on `rerank_batch` queries
    at a time; returns (Q, rerank_k) scores) and the rank becomes 1 + the number of wrong
    candidates among those k whose re-rank score is >= the best re-rank score of the correct
    ones among them (ties against the model again). Queries ranked beyond `rerank_k` keep their
    rank, so Recall@K for K >= rerank_k does not change.

    Args:
        image_features: (N_i, D), L2-normalised.
        text_features: (N_t, D), L2-normalised.
        text_image: (N_t,) integer, the image index of each text (any number of texts per image).
        ks: the K of Recall@K.
        chunk_size: side of the square score blocks; None chooses it from `max_memory_bytes`.
        max_memory_bytes: budget of one block (scores + comparison masks + feature chunks).
        tie_tolerance: absolute score margin counted as a tie; None: exact, or the default
            margin where the check fails (see the module docstring).
        rerank: optional re-ranking scorer (see above).
        rerank_k: number of embedding candidates re-scored per query.
        rerank_batch: queries per `rerank` call.
    """
    _check_pair(image_features, text_features, ("image_features", "text_features"))
    n_images, dim = image_features.shape
    n_texts = text_features.shape[0]
    if not isinstance(text_image, Tensor) or text_image.ndim != 1:
        raise ValueError(f"text_image must be a 1-D tensor (N_t,), got {_describe(text_image)}")
    if (
        text_image.dtype.is_floating_point
        or text_image.dtype.is_complex
        or text_image.dtype == torch.bool
    ):
        raise ValueError(f"text_image must be an integer tensor, got {text_image.dtype}")
    if text_image.shape[0] != n_texts:
        raise ValueError(
            f"text_image must have one entry per text ({n_texts}), got {text_image.shape[0]}"
        )
    text_image = text_image.to(device=text_features.device, dtype=torch.long)
    low, high = text_image.min().item(), text_image.max().item()
    if low < 0 or high >= n_images:
        raise ValueError(
            f"text_image values must be image indices in [0, {n_images}), got [{low}, {high}]"
        )
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    _check_positive("chunk_size", chunk_size)
    _check_positive("rerank_k", rerank_k)
    _check_positive("rerank_batch", rerank_batch)
    if tie_tolerance is not None and not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance must be >= 0 or None, got {tie_tolerance!r}")

    dtype = _compute_dtype(image_features, text_features)
    itemsize = torch.finfo(dtype).bits // 8
    chunk = chunk_size or auto_chunk_size(dim, itemsize, max_memory_bytes)
    device = text_features.device
    norms = _max_norm("image_features", image_features, chunk, dtype) * _max_norm(
        "text_features", text_features, chunk, dtype
    )
    text_score = _correct_scores(image_features, text_features, text_image, dtype)
    # the best caption of each image (a segment max); images without captions are not queries
    image_score = torch.full((n_images,), -math.inf, dtype=dtype, device=device)
    image_score.scatter_reduce_(0, text_image, text_score, reduce="amax")
    has_caption = torch.bincount(text_image, minlength=n_images) > 0
    image_score = torch.where(has_caption, image_score, math.inf)  # +inf: counts nothing

    tolerance = 0.0 if tie_tolerance is None else tie_tolerance
    text_count, image_count, consistent = _count_pass(
        image_features, text_features, text_image, text_score, image_score, tolerance, chunk, dtype
    )
    if tie_tolerance is None and not consistent:
        tolerance = 4 * torch.finfo(dtype).eps * norms
        text_count, image_count, _ = _count_pass(
            image_features, text_features, text_image, text_score, image_score, tolerance,
            chunk, dtype,
        )  # fmt: skip
    text_rank = text_count + 1
    image_query = torch.nonzero(has_caption).squeeze(1)
    image_rank = image_count[image_query] + 1

    if rerank is not None:
        text_rank = _rerank(
            text_rank,
            torch.arange(n_texts, device=device),
            text_features,
            image_features,
            lambda q, cand: cand == text_image[q][:, None],
            rerank,
            rerank_k,
            rerank_batch,
            chunk,
            max_memory_bytes,
            query_is_image=False,
        )
        image_rank = _rerank(
            image_rank,
            image_query,
            image_features,
            text_features,
            lambda q, cand: text_image[cand] == q[:, None],
            rerank,
            rerank_k,
            rerank_batch,
            chunk,
            max_memory_bytes,
            query_is_image=True,
        )

    return RetrievalResult(
        image_to_text=_summarise(image_rank, image_query, ks),
        text_to_image=_summarise(text_rank, torch.arange(n_texts, device=device), ks),
        tie_tolerance=tolerance,
    )


def _correct_scores(
    image_features: Tensor, text_features: Tensor, text_image: Tensor, dtype: torch.dtype
) -> Tensor:
    """(N_t,) score of each text with its own image, as the diagonal of (g, g) matmuls: the
    same BLAS kernel as the blocks, so on CPU the values match the blocks' bit for bit in
    practice (an elementwise product + sum differs by a few ulp). Checked in `_count_pass`."""
    text_score = torch.empty(text_features.shape[0], dtype=dtype, device=text_features.device)
    for a, b in _bounds(text_features.shape[0], _GROUP):
        images = image_features[text_image[a:b]].to(dtype)  # (g, D)
        text_score[a:b] = (text_features[a:b].to(dtype) @ images.T).diagonal()
    return text_score


def _count_pass(
    image_features: Tensor,
    text_features: Tensor,
    text_image: Tensor,
    text_score: Tensor,
    image_score: Tensor,
    tolerance: float,
    chunk: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, bool]:
    """One pass over the (text chunk, image chunk) blocks: for each text, the number of wrong
    images with score >= its correct score - tolerance, and for each image the number of wrong
    texts with score >= its best caption's score - tolerance. Also returns whether every
    correct pair's score in its block equals `text_score` exactly."""
    device = text_features.device
    text_threshold = text_score - tolerance
    image_threshold = image_score - tolerance
    # counts of candidates (wrong or correct) with score >= threshold, then minus the correct
    text_count = torch.zeros(text_features.shape[0], dtype=torch.long, device=device)
    image_count = torch.zeros(image_features.shape[0], dtype=torch.long, device=device)
    mismatch = torch.zeros((), dtype=torch.bool, device=device)
    image_bounds = _bounds(image_features.shape[0], chunk)
    for a, b in _bounds(text_features.shape[0], chunk):
        texts = text_features[a:b].to(dtype)  # (ct, D)
        row_threshold = text_threshold[a:b, None]
        targets = text_image[a:b]
        for c, d in image_bounds:
            scores = texts @ image_features[c:d].to(dtype).T  # (ct, ci)
            text_count[a:b] += (scores >= row_threshold).sum(1, dtype=torch.int32)
            image_count[c:d] += (scores >= image_threshold[None, c:d]).sum(0, dtype=torch.int32)
            # the correct (text, image) pairs inside this block
            rows = torch.nonzero((targets >= c) & (targets < d)).squeeze(1)
            cols = targets[rows]
            values = scores[rows, cols - c]
            text_count[a + rows] -= (values >= text_threshold[a + rows]).long()
            image_count.index_add_(0, cols, -(values >= image_threshold[cols]).long())
            mismatch |= (values != text_score[a + rows]).any()
            del scores  # free the block before the next one is allocated
    return text_count, image_count, not mismatch.item()


def _summarise(ranks: Tensor, query_index: Tensor, ks: tuple[int, ...]) -> DirectionResult:
    as_float = ranks.double()
    return DirectionResult(
        recall={k: (ranks <= k).double().mean().item() for k in ks},
        mean_rank=as_float.mean().item(),
        median_rank=as_float.median().item(),
        ranks=ranks,
        query_index=query_index,
    )


def _rerank(
    ranks: Tensor,
    query_index: Tensor,
    query_features: Tensor,
    gallery_features: Tensor,
    is_correct: Callable[[Tensor, Tensor], Tensor],
    rerank: Reranker,
    k: int,
    batch: int,
    chunk: int,
    max_memory_bytes: int,
    *,
    query_is_image: bool,
) -> Tensor:
    """New ranks after re-scoring the top-k candidates of the queries ranked <= k."""
    k = min(k, gallery_features.shape[0])
    ranks = ranks.clone()
    positions = torch.nonzero(ranks <= k).squeeze(1)  # positions in `ranks`
    for start in range(0, positions.shape[0], batch):
        pos = positions[start : start + batch]
        queries = query_index[pos]
        _, candidates = topk_retrieval(
            query_features[queries],
            gallery_features,
            k,
            chunk_size=chunk,
            max_memory_bytes=max_memory_bytes,
        )
        expanded = queries[:, None].expand_as(candidates)
        image_index, text_index = (
            (expanded, candidates) if query_is_image else (candidates, expanded)
        )
        scores = torch.as_tensor(rerank(image_index, text_index), device=candidates.device)
        if scores.shape != candidates.shape:
            raise ValueError(
                f"rerank must return scores of shape {tuple(candidates.shape)} (queries, k), "
                f"got {tuple(scores.shape)}"
            )
        correct = is_correct(queries, candidates)  # (q, k)
        best = torch.where(correct, scores, -math.inf).amax(1, keepdim=True)
        new = ((scores >= best) & ~correct).sum(1) + 1
        # a correct candidate is always in the top k when the rank is <= k, up to rounding
        found = correct.any(1)
        ranks[pos[found]] = new[found]
    return ranks


@torch.no_grad()
def topk_retrieval(
    query_features: Tensor,
    gallery_features: Tensor,
    k: int,
    *,
    chunk_size: int | None = None,
    max_memory_bytes: int = 512 * 2**20,
) -> tuple[Tensor, Tensor]:
    """The k best gallery items of each query by dot product: (scores (Q, k), indices (Q, k)),
    best first. Computed as a running top-k merged over gallery chunks, so the (Q, N) score
    matrix is never held; the order among exactly tied scores is unspecified."""
    _check_pair(query_features, gallery_features, ("query_features", "gallery_features"))
    n_gallery = gallery_features.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_gallery:
        raise ValueError(f"k must be an int in [1, {n_gallery}] (the gallery size), got {k!r}")
    _check_positive("chunk_size", chunk_size)
    dtype = _compute_dtype(query_features, gallery_features)
    itemsize = torch.finfo(dtype).bits // 8
    chunk = chunk_size or auto_chunk_size(query_features.shape[1], itemsize, max_memory_bytes)
    device = query_features.device
    n_queries = query_features.shape[0]
    top_scores = torch.empty(n_queries, k, dtype=dtype, device=device)
    top_index = torch.empty(n_queries, k, dtype=torch.long, device=device)
    gallery_bounds = _bounds(n_gallery, chunk)
    for a, b in _bounds(n_queries, chunk):
        queries = query_features[a:b].to(dtype)  # (cq, D)
        best_scores = torch.empty(b - a, 0, dtype=dtype, device=device)
        best_index = torch.empty(b - a, 0, dtype=torch.long, device=device)
        for c, d in gallery_bounds:
            scores = queries @ gallery_features[c:d].to(dtype).T  # (cq, cg)
            values, index = scores.topk(min(k, d - c), dim=1)
            merged = torch.cat([best_scores, values], dim=1)
            merged_index = torch.cat([best_index, index + c], dim=1)
            best_scores, order = merged.topk(min(k, merged.shape[1]), dim=1)
            best_index = merged_index.gather(1, order)
            del scores
        top_scores[a:b], top_index[a:b] = best_scores, best_index
    return top_scores, top_index
