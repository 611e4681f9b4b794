"""Re-ranking retrieval with an image-text matching head (ALBEF, BLIP; `multimodal retrieval
--rerank-itm K`): each query's top K candidates by embedding similarity are re-ordered by the
ITM head's match probability; queries whose true item is not in their top K keep their rank.

The ITM head reads the towers' token features, not the pooled embeddings, so they are computed
again, for the re-scored (image, text) pairs only: the pairs are collected first (the candidates
`retrieval_metrics` re-scores), then scored in one ordered pass over the data, holding the
image tokens of one loader batch and the text tokens of `batch_size` pairs at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from multimodal.eval.loading import LoadedModel
from multimodal.eval.retrieval import RetrievalResult, retrieval_metrics
from multimodal.eval.zeroshot import PRECISIONS, eval_mode

NO_ITM_HEAD = (
    "--rerank-itm needs a model with an image-text matching head (a checkpoint of "
    "ContrastivePretraining(itm_head=ITMHead(...))); {what} has none"
)


def check_itm_model(loaded: LoadedModel) -> None:
    """ValueError (one line) unless `loaded` has an ITM head and towers returning tokens."""
    if loaded.itm_head is None:
        raise ValueError(NO_ITM_HEAD.format(what=loaded.description))
    for tower in ("image_tower", "text_tower"):
        if getattr(loaded.model, tower, None) is None:
            raise ValueError(
                f"--rerank-itm needs the model's {tower} (token features for the ITM head); "
                f"{type(loaded.model).__name__} has none"
            )


def _pair_codes(image_index: Tensor, text_index: Tensor, n_texts: int) -> Tensor:
    return image_index.reshape(-1) * n_texts + text_index.reshape(-1)


@torch.no_grad()
def itm_pair_scores(
    loaded: LoadedModel,
    loader: Iterable[dict[str, Any]],
    keys: Sequence[str],
    texts: Sequence[str],
    image_index: Tensor,
    text_index: Tensor,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    progress: bool = True,
) -> Tensor:
    """(P,) fp32 log-probability of a match (`ITMHead.match_score`) of the pairs
    (image `image_index[p]`, text `text_index[p]`), in one pass over `loader` (the same images
    in the same order as `keys`); the text tokens of `batch_size` pairs are computed at once."""
    check_itm_model(loaded)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
    model, head = loaded.model, loaded.itm_head
    assert head is not None
    device = next(model.parameters()).device
    dtype = PRECISIONS[precision]
    image_index, text_index = image_index.reshape(-1).cpu(), text_index.reshape(-1).cpu()
    order = torch.argsort(image_index, stable=True)
    sorted_images = image_index[order]
    scores = torch.full((image_index.shape[0],), float("nan"))
    seen = 0
    with eval_mode(model), eval_mode(head):
        for batch in tqdm(loader, disable=not progress, desc="ITM re-ranking", unit="batch"):
            n = len(batch["keys"])
            if list(batch["keys"]) != list(keys[seen : seen + n]):
                raise RuntimeError("the data yielded other samples in the re-ranking pass")
            lo = int(torch.searchsorted(sorted_images, seen))
            hi = int(torch.searchsorted(sorted_images, seen + n))
            if hi > lo:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    image_tokens = model.image_tower(batch["images"].to(device)).tokens  # (b, N, D)
                for start in range(lo, hi, batch_size):
                    pairs = order[start : min(start + batch_size, hi)]
                    encoded = loaded.tokenizer.batch_encode(
                        [texts[t] for t in text_index[pairs].tolist()],
                        max_length=loaded.context_length,
                    )
                    ids = encoded.input_ids.to(device)
                    mask = encoded.attention_mask.to(device)
                    rows = (image_index[pairs] - seen).to(device)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        text_tokens = model.text_tower(ids, mask).tokens  # (p, T, D_t)
                        match = head.match_score(image_tokens[rows], text_tokens, mask)
                    scores[pairs] = match.float().cpu()
            seen += n
    if seen != len(keys):
        raise RuntimeError(f"the re-ranking pass read {seen} images, expected {len(keys)}")
    return scores


def rerank_with_scores(
    image_features: Tensor,
    text_features: Tensor,
    text_image: Tensor,
    score_pairs: Callable[[Tensor, Tensor], Tensor],
    *,
    k: int,
    ks: Sequence[int],
    max_memory_bytes: int = 512 * 2**20,
    rerank_batch: int = 256,
) -> RetrievalResult:
    """`retrieval_metrics` with the top-`k` candidates re-scored by `score_pairs(image_index
    (P,), text_index (P,)) -> (P,)`, called ONCE on every pair to re-score (so that it may make
    one pass over the data): the pairs are first collected with a placeholder scorer."""
    asked: list[Tensor] = []
    n_texts = text_features.shape[0]

    def collect(image_index: Tensor, text_index: Tensor) -> Tensor:
        asked.append(_pair_codes(image_index, text_index, n_texts).cpu())
        return torch.zeros(image_index.shape, device=image_index.device)

    options: dict[str, Any] = dict(
        ks=ks, max_memory_bytes=max_memory_bytes, rerank_k=k, rerank_batch=rerank_batch
    )
    retrieval_metrics(image_features, text_features, text_image, rerank=collect, **options)
    codes = torch.unique(torch.cat(asked)) if asked else torch.empty(0, dtype=torch.long)
    values = score_pairs(codes // n_texts, codes % n_texts).float().cpu()

    def lookup(image_index: Tensor, text_index: Tensor) -> Tensor:
        wanted = _pair_codes(image_index, text_index, n_texts).cpu()
        where = torch.searchsorted(codes, wanted).clamp(max=max(len(codes) - 1, 0))
        if len(codes) == 0 or not torch.equal(codes[where], wanted):
            raise RuntimeError("re-ranking asked for a pair that was not scored")
        return values[where].reshape(image_index.shape).to(image_index.device)

    return retrieval_metrics(image_features, text_features, text_image, rerank=lookup, **options)
