"""Corpus-level captioning metrics: BLEU-1..4, ROUGE-L, CIDEr-D and exact match.

Inputs are one generated caption per image (`candidates`) and the reference captions of each
image (`references`, a list of lists). Everything is computed on the tokens of
`tokenize_caption`, an approximation of the PTB tokenisation that the COCO caption evaluation
(coco-caption) runs first.

Written by hand because no installed library matches the published definitions:
- torchmetrics' BLEU picks, among references equally close in length to the candidate, the
  first one listed; Papineni et al. (and coco-caption, NLTK) take the shorter one, which changes
  the brevity penalty. Everything else agrees (the tests compare with torchmetrics where no
  such tie decides);
- torchmetrics' ROUGE-L takes the reference with the best F (and needs nltk); coco-caption's
  takes the best precision and the best recall separately, over all references;
- CIDEr-D is in no installed library.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "bleu",
    "bleu_caveats",
    "caption_metrics",
    "cider_d",
    "cider_d_scores",
    "rouge_l",
    "tokenize_caption",
]

Tokens = list[str]
NGram = tuple[str, ...]

# PTB splits these clitics off their word ("don't" -> "do n't", "dog's" -> "dog 's").
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_CLITICS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})
# coco-caption drops the PTB tokens of . ? ! , : ; - -- ... quotes and brackets: here those
# characters become spaces (a period only outside a number: "2.5" stays one token).
_PUNCTUATION = re.compile(r"[?!,:;\"`()\[\]{}]|(?<!\d)\.|\.(?!\d)")


def tokenize_caption(text: str) -> Tokens:
    """Lower-cased tokens with the punctuation coco-caption removes taken out.

    Approximates coco-caption's Stanford PTB tokenizer + punctuation filter: clitics split off
    (``"don't"`` -> ``do n't``), ``. ? ! , : ;``, quotes and brackets removed, hyphens kept inside
    words (``black-and-white``) and dropped on their own or at a word's ends.
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a str, got {type(text).__name__}")
    text = _PUNCTUATION.sub(" ", _CLITIC.sub(r" \1", text.lower()))
    tokens = []
    for token in text.split():
        if token not in _CLITICS:
            token = token.strip("'-")
        if token:
            tokens.append(token)
    return tokens


def _ngrams(tokens: Tokens, n: int) -> Counter[NGram]:
    """Counts of the n-grams of exactly length n."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _prepare(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[Tokens], list[list[Tokens]]]:
    """Validate the corpus and tokenise it."""
    if isinstance(candidates, str) or isinstance(references, str):
        raise TypeError("candidates must be a list of str and references a list of lists of str")
    if len(candidates) != len(references):
        raise ValueError(
            f"candidates and references differ in length: {len(candidates)} != {len(references)}"
            " (one candidate and one list of references per image)"
        )
    if len(candidates) == 0:
        raise ValueError("the corpus is empty: expected at least one candidate")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i}] must be a list of str, got {refs!r}")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty: every image needs >= 1 reference")
    cands = [tokenize_caption(c) for c in candidates]
    refs = [[tokenize_caption(r) for r in rs] for rs in references]
    return cands, refs


def _bleu(cands: list[Tokens], refs: list[list[Tokens]], max_n: int) -> dict[str, float]:
    matched = [0] * max_n  # clipped n-gram matches, summed over the corpus
    total = [0] * max_n  # candidate n-grams
    cand_len = ref_len = 0
    for cand, rs in zip(cands, refs, strict=True):
        cand_len += len(cand)
        # the reference length closest to the candidate's; ties -> the shorter
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(cand, n)
            most = Counter()  # each n-gram's largest count in one reference
            for r in rs:
                most |= _ngrams(r, n)
            matched[n - 1] += sum((counts & most).values())
            total[n - 1] += sum(counts.values())
    if cand_len == 0:
        brevity = 0.0
    else:
        brevity = 1.0 if cand_len > ref_len else math.exp(1.0 - ref_len / cand_len)
    scores, log_precision = {}, 0.0
    for n in range(1, max_n + 1):
        if matched[n - 1] == 0:  # a zero precision makes this order and every higher one 0
            log_precision = -math.inf
        if log_precision > -math.inf:
            log_precision += math.log(matched[n - 1] / total[n - 1])
        scores[f"bleu_{n}"] = brevity * math.exp(log_precision / n)
    return scores


def bleu(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> dict[str, float]:
    """Corpus BLEU-1..max_n (Papineni et al. 2002): ``BP * exp(mean_{k<=n} log p_k)``.

    p_k: the candidates' k-grams, each counted at most as often as it occurs in one reference,
    summed over the corpus, over all candidate k-grams. BP = 1 when the candidates' total
    length c exceeds r, else ``exp(1 - r / c)``; r sums, per candidate, the length of the
    reference closest to it (ties -> the shorter). No smoothing: a zero p_k gives 0.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    return _bleu(*_prepare(candidates, references), max_n)


def _lcs(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge_l(cands: list[Tokens], refs: list[list[Tokens]], beta: float) -> float:
    scores = []
    for cand, rs in zip(cands, refs, strict=True):
        lcs = [_lcs(cand, r) for r in rs]
        precision = max((m / len(cand) if cand else 0.0) for m in lcs)
        recall = max((m / len(r) if r else 0.0) for m, r in zip(lcs, rs, strict=True))
        if precision > 0 and recall > 0:
            f = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
        else:
            f = 0.0
        scores.append(f)
    return sum(scores) / len(scores)


def rouge_l(
    candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2
) -> float:
    """ROUGE-L as coco-caption computes it, averaged over candidates.

    Per candidate: P = max over references of LCS / len(candidate), R = max over references of
    LCS / len(reference) (the two maxima may come from different references), and
    ``F = (1 + beta^2) P R / (R + beta^2 P)`` (0 when P or R is 0).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return _rouge_l(*_prepare(candidates, references), beta)


def _cider_d_scores(
    cands: list[Tokens], refs: list[list[Tokens]], n: int, sigma: float
) -> list[float]:
    """Each image's CIDEr-D, with the document frequencies of the whole corpus."""

    def counts(tokens: Tokens) -> Counter[NGram]:
        return sum((_ngrams(tokens, k) for k in range(1, n + 1)), Counter())

    ref_counts = [[counts(r) for r in rs] for rs in refs]
    document_frequency = Counter()  # the images whose references hold the n-gram
    for image in ref_counts:
        document_frequency.update(set().union(*image))
    log_images = math.log(len(refs))

    def tfidf(c: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float]]:
        vectors: list[dict[NGram, float]] = [{} for _ in range(n)]
        for gram, tf in c.items():
            vectors[len(gram) - 1][gram] = tf * (
                log_images - math.log(max(1, document_frequency[gram]))
            )
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
        return vectors, norms

    scores = []
    for cand, image, rs in zip(cands, ref_counts, refs, strict=True):
        vec, norm = tfidf(counts(cand))
        total = 0.0
        for ref, ref_tokens in zip(image, rs, strict=True):
            vec_r, norm_r = tfidf(ref)
            penalty = math.exp(-((len(cand) - len(ref_tokens)) ** 2) / (2 * sigma**2))
            for k in range(n):
                ref_k = vec_r[k]
                dot = sum(min(w, ref_k.get(g, 0.0)) * ref_k.get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    total += dot / (norm[k] * norm_r[k]) * penalty
        scores.append(10.0 * total / (n * len(image)))
    return scores


def _cider_d(cands: list[Tokens], refs: list[list[Tokens]], n: int, sigma: float) -> float:
    scores = _cider_d_scores(cands, refs, n, sigma)
    return sum(scores) / len(scores)


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """CIDEr-D (Vedantam et al. 2015) as coco-caption's CiderD computes it ("corpus" idf).

    For k = 1..n, an n-gram g of length k in a caption with count tf(g) gets the weight
    ``w(g) = tf(g) * (log(N) - log(max(1, df(g))))``: N images, df(g) the number of images
    whose references contain g (candidates do not count; an n-gram in every image weighs 0,
    one in no reference weighs log N). For a candidate c and one of its references r::

        s_k(c, r) = sum_{g of length k} min(w_c(g), w_r(g)) * w_r(g) / (|w_c|_k * |w_r|_k)
                    * exp(-(l_c - l_r)^2 / (2 sigma^2))

    where ``|w|_k`` is the norm of the k-gram weights *before* clipping (s_k = 0 when either
    norm is 0) and l the number of tokens (coco-caption counts bigrams, words - 1: the same
    differences except where a caption is empty, and then s_k = 0 either way). An image
    scores ``10 * mean_k mean_r s_k(c, r)``; the corpus scores the mean over images.
    A candidate equal to all its references scores 10 * (the share of the orders k whose
    weights are not all 0), e.g. 7.5 for three words found in no other image (no 4-grams).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return _cider_d(*_prepare(candidates, references), n, sigma)


def cider_d_scores(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
) -> list[float]:
    """The CIDEr-D of each image (see `cider_d`, whose value is their mean): the document
    frequencies come from the whole corpus, so an image's score depends on the others'
    references. For finding the best and worst captions of an evaluation."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return _cider_d_scores(*_prepare(candidates, references), n, sigma)


def caption_metrics(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """bleu_1..bleu_4, rouge_l, cider_d and exact_match (the share of candidates whose tokens
    equal those of one of their references), tokenising the corpus once."""
    cands, refs = _prepare(candidates, references)
    return {
        **_bleu(cands, refs, 4),
        "rouge_l": _rouge_l(cands, refs, 1.2),
        "cider_d": _cider_d(cands, refs, 4, 6.0),
        "exact_match": sum(c in rs for c, rs in zip(cands, refs, strict=True)) / len(cands),
    }


def bleu_caveats(candidates: Sequence[str], max_n: int = 4) -> dict[str, str]:
    """{"bleu_n": why} for each n <= max_n whose BLEU-n is 0 by construction: no candidate has
    n tokens, so there is no n-gram to match. Short captions ("the digit seven") score BLEU-4
    = 0 even when every one equals a reference; reports say so next to the figure."""
    longest = max((len(tokenize_caption(c)) for c in candidates), default=0)
    return {
        f"bleu_{n}": (
            f"0 by construction: no caption written has {n} tokens (the longest has "
            f"{longest}), so no {n}-gram can match; ROUGE-L, CIDEr-D and exact match still "
            "score them"
        )
        for n in range(longest + 1, max_n + 1)
    }
