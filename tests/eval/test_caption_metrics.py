"""Captioning metrics against hand computations from the published definitions, an independent
brute-force BLEU, torchmetrics' BLEU where its tie rule cannot decide, and brute-force LCS."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
from torchmetrics.functional.text import bleu_score

from multimodal.eval.caption_metrics import (
    bleu,
    bleu_caveats,
    caption_metrics,
    cider_d,
    rouge_l,
    tokenize_caption,
)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A Dog, running.", ["a", "dog", "running"]),
        ("Is it red?!", ["is", "it", "red"]),
        ("a black-and-white cat -- asleep", ["a", "black-and-white", "cat", "asleep"]),
        ("the dog's toy; don't", ["the", "dog", "'s", "toy", "do", "n't"]),  # PTB clitics
        ('a "quoted" (word) ...', ["a", "quoted", "word"]),
        ("2.5 metres. End.", ["2.5", "metres", "end"]),
        ("  spaced \t out\n", ["spaced", "out"]),
        ("", []),
    ],
)
def test_tokenize_caption(text, tokens):
    assert tokenize_caption(text) == tokens


def test_bleu_by_hand_with_brevity_penalty():
    # Papineni et al. 2002, corpus BLEU. Image 1: candidate "the cat is on mat" (c=5), refs of
    # 6 and 7 words -> closest 6. Clipped matches: 1-grams 5/5; 2-grams the-cat, cat-is, is-on
    # (on-mat is in no ref) 3/4; 3-grams the-cat-is, cat-is-on 2/3; 4-grams the-cat-is-on 1/2.
    # Image 2: "a dog" (c=2) vs "a dog barks" (r=3): 1-grams 2/2, 2-grams 1/1, none longer.
    # Corpus sums: p1 = 7/7, p2 = 4/5, p3 = 2/3, p4 = 1/2; c = 7 < r = 9, so
    # BP = exp(1 - 9/7) = exp(-2/7); BLEU-n = BP * (p1 ... pn)^(1/n).
    candidates = ["the cat is on mat", "a dog"]
    references = [["the cat is on the mat", "there is a cat on the mat"], ["a dog barks"]]
    scores = bleu(candidates, references)
    bp = math.exp(-2 / 7)
    assert scores["bleu_1"] == pytest.approx(bp)
    assert scores["bleu_2"] == pytest.approx(bp * (4 / 5) ** (1 / 2))
    assert scores["bleu_3"] == pytest.approx(bp * (4 / 5 * 2 / 3) ** (1 / 3))
    assert scores["bleu_4"] == pytest.approx(bp * (4 / 5 * 2 / 3 * 1 / 2) ** (1 / 4))
    # image 1 alone: BP = exp(1 - 6/5); BLEU-4 = exp(-0.2) * (1 * 3/4 * 2/3 * 1/2)^(1/4)
    alone = bleu(candidates[:1], references[:1])["bleu_4"]
    assert alone == pytest.approx(math.exp(-0.2) / math.sqrt(2))


@pytest.mark.parametrize("order", [1, -1])
def test_bleu_ties_in_reference_length_take_the_shorter(order):
    # candidate of 6 words, references of 7 and 5 words, both 1 away: Papineni (and
    # coco-caption, NLTK) take 5 -> c > r -> BP = 1; every n-gram matches -> BLEU = 1.
    # (torchmetrics takes the first listed: with 7 first it would give exp(1 - 7/6).)
    references = [["a b c d e f g", "a b c d e"][::order]]
    assert bleu(["a b c d e f"], references) == pytest.approx(
        {f"bleu_{n}": 1.0 for n in range(1, 5)}
    )


def brute_force_bleu(cands: list[list[str]], refs: list[list[list[str]]], max_n: int):
    """Corpus BLEU from the definition with exact fractions and list scans (no Counter)."""
    matched = [0] * max_n
    total = [0] * max_n
    c = r = 0
    for cand, rs in zip(cands, refs, strict=True):
        c += len(cand)
        r += len(sorted(rs, key=lambda ref: (abs(len(ref) - len(cand)), len(ref)))[0])
        for n in range(1, max_n + 1):
            grams = [cand[i : i + n] for i in range(len(cand) - n + 1)]
            total[n - 1] += len(grams)
            for gram in {tuple(g) for g in grams}:
                in_cand = grams.count(list(gram))
                windows = [[ref[i : i + n] for i in range(len(ref) - n + 1)] for ref in rs]
                in_refs = max(w.count(list(gram)) for w in windows)
                matched[n - 1] += min(in_cand, in_refs)
    out = {}
    for n in range(1, max_n + 1):
        if c == 0 or any(m == 0 for m in matched[:n]):
            out[f"bleu_{n}"] = 0.0
            continue
        product = math.prod(Fraction(m, t) for m, t in zip(matched[:n], total[:n], strict=True))
        bp = 1.0 if c > r else math.exp(1 - r / c)
        out[f"bleu_{n}"] = bp * float(product) ** (1 / n)
    return out


def random_corpus(rng: random.Random, images: int) -> tuple[list[str], list[list[str]]]:
    def sentence(low: int) -> str:
        return " ".join(rng.choice("abcd") for _ in range(rng.randint(low, 9)))

    candidates = [sentence(1) for _ in range(images)]
    references = [[sentence(1) for _ in range(rng.randint(1, 4))] for _ in range(images)]
    return candidates, references


@pytest.mark.parametrize("seed", range(5))
def test_bleu_matches_brute_force_and_torchmetrics(seed):
    rng = random.Random(seed)
    candidates, references = random_corpus(rng, images=rng.randint(1, 6))
    ours = bleu(candidates, references)
    cands = [c.split() for c in candidates]
    refs = [[r.split() for r in rs] for rs in references]
    assert ours == pytest.approx(brute_force_bleu(cands, refs, 4), rel=1e-12, abs=1e-12)
    # torchmetrics agrees once the references are sorted by length (its first-listed tie rule
    # then picks the shorter one, as Papineni does)
    by_length = [sorted(rs, key=lambda r: len(r.split())) for rs in references]
    for n in range(1, 5):
        expected = float(bleu_score(candidates, by_length, n_gram=n))
        assert ours[f"bleu_{n}"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_rouge_l_by_hand_takes_best_precision_and_best_recall_separately():
    # coco-caption ROUGE-L, beta = 1.2. Candidate "the cat sat on the mat" (6 tokens).
    # ref 1 "the cat was on the mat": LCS "the cat on the mat" = 5 -> P = 5/6, R = 5/6.
    # ref 2 "cat sat": LCS "cat sat" = 2 -> P = 2/6, R = 2/2 = 1.
    # max P = 5/6 (ref 1), max R = 1 (ref 2): F = 2.44 * 5/6 * 1 / (1 + 1.44 * 5/6) = 0.92424...
    # (torchmetrics' best-F-per-reference rule would give ref 1's F = 5/6 instead.)
    score = rouge_l(["the cat sat on the mat"], [["the cat was on the mat", "cat sat"]])
    assert score == pytest.approx((1 + 1.44) * (5 / 6) / (1 + 1.44 * 5 / 6))
    assert score == pytest.approx(0.9242424242)
    # averaged over candidates; a candidate sharing no token scores 0
    two = rouge_l(["the cat sat on the mat", "zebra"], [["the cat was on the mat", "cat sat"]] * 2)
    assert two == pytest.approx(score / 2)


def brute_force_lcs(a: list[str], b: list[str]) -> int:
    """The longest subsequence of a that is also a subsequence of b, by enumeration."""

    def is_subsequence(seq, of):
        it = iter(of)
        return all(token in it for token in seq)

    for size in range(len(a), 0, -1):
        if any(is_subsequence(s, b) for s in itertools.combinations(a, size)):
            return size
    return 0


@pytest.mark.parametrize("seed", range(5))
def test_rouge_l_matches_brute_force_lcs(seed):
    rng = random.Random(seed)
    candidates, references = random_corpus(rng, images=4)
    beta = 1.2
    expected = []
    for cand, rs in zip(candidates, references, strict=True):
        c = cand.split()
        lcs = [brute_force_lcs(c, r.split()) for r in rs]
        p = max(m / len(c) for m in lcs)
        r = max(m / len(ref.split()) for m, ref in zip(lcs, rs, strict=True))
        expected.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    assert rouge_l(candidates, references, beta=beta) == pytest.approx(sum(expected) / 4)


def test_perfect_candidates_score_one_and_exact_match_ignores_case_and_punctuation():
    candidates = ["A man riding a horse.", "two dogs play in the snow"]
    references = [["a man riding a horse", "a person on a horse"], ["Two dogs play in the snow!"]]
    metrics = caption_metrics(candidates, references)
    for n in range(1, 5):
        assert metrics[f"bleu_{n}"] == pytest.approx(1.0)
    assert metrics["rouge_l"] == pytest.approx(1.0)
    assert metrics["exact_match"] == 1.0
    assert caption_metrics(["a man riding"], references[:1])["exact_match"] == 0.0


def test_bleu_of_captions_without_n_grams_is_zero_and_flagged():
    """Captions equal to their references but of 3 tokens: BLEU-1..3 are 1, BLEU-4 0 (no
    4-gram to match), and `bleu_caveats` names BLEU-4 alone; a 4-token caption clears it."""
    candidates, references = ["the digit seven", "A handwritten 7"], [["the digit seven"]] * 2
    references[1] = ["a handwritten 7", "a photo of the number seven"]
    metrics = caption_metrics(candidates, references)
    assert [metrics[f"bleu_{n}"] for n in range(1, 4)] == pytest.approx([1.0, 1.0, 1.0])
    assert metrics["bleu_4"] == 0.0 and metrics["exact_match"] == 1.0
    caveats = bleu_caveats(candidates)
    assert list(caveats) == ["bleu_4"] and "no caption written has 4 tokens" in caveats["bleu_4"]
    assert list(bleu_caveats(["a"])) == ["bleu_2", "bleu_3", "bleu_4"]
    assert bleu_caveats([*candidates, "a photo of the number seven"]) == {}


def test_cider_d_by_hand_on_three_images():
    # CIDEr-D (vrama91/coco-caption CiderD, "corpus" idf), n = 2 orders, sigma = 6.
    # N = 3 images; df over the references of each image:
    #   img 1 refs "a cat sits", "a cat"   img 2 ref "a dog runs"   img 3 ref "a dog"
    #   df(a) = 3 -> idf 0; df(dog) = df(a dog) = 2 -> idf D = log 3 - log 2;
    #   cat, sits, runs, a-cat, cat-sits, dog-runs: df 1 -> idf L = log 3;
    #   n-grams in no reference (dog-sits, dog-dog): df 0 -> log(max(1, 0)) = 0 -> idf L.
    # l = the caption length (in words).
    L, D = math.log(3), math.log(3) - math.log(2)
    g = math.exp(-1 / 72)  # length penalty for |l_c - l_r| = 1: exp(-1 / (2 * 6^2))
    # img 1, candidate "a cat" (tf-idf: a 0, cat L | a-cat L; l = 2)
    #   vs "a cat sits" (a 0, cat L, sits L | a-cat L, cat-sits L; l = 3):
    #     k=1: min(L, L) * L / (|(0, L)| * |(0, L, L)|) = L^2 / (L * sqrt(2) L) = 1/sqrt(2)
    #     k=2: L^2 / (L * sqrt(2) L) = 1/sqrt(2); both times g
    #   vs "a cat" (identical, l = 2): 1 and 1
    #   score = 10 * mean_k mean_refs = 10 * (1/sqrt(2) g + 1) / 2
    image_1 = 10 * (g / math.sqrt(2) + 1) / 2
    # img 2, candidate "a dog sits" (a 0, dog D, sits L | a-dog D, dog-sits L; l = 3)
    #   vs "a dog runs" (a 0, dog D, runs L | a-dog D, dog-runs L; l = 3):
    #     k=1: D^2 / (sqrt(D^2 + L^2))^2 ; k=2: the same; no length penalty
    image_2 = 10 * D**2 / (D**2 + L**2)
    # img 3, candidate "dog dog" (dog 2D | dog-dog L) vs "a dog" (a 0, dog D | a-dog D), l = 2:
    #     k=1: clipped min(2D, D) * D = D^2 over the unclipped norms 2D * D -> 1/2
    #     k=2: dog-dog is not in the reference -> 0; l equal -> no penalty
    image_3 = 10 * (1 / 2 + 0) / 2
    score = cider_d(
        ["a cat", "a dog sits", "dog dog"],
        [["a cat sits", "a cat"], ["a dog runs"], ["a dog"]],
        n=2,
    )
    assert score == pytest.approx((image_1 + image_2 + image_3) / 3)
    assert score == pytest.approx(4.0618669434)


def test_cider_d_of_candidates_equal_to_their_references():
    # Every order k with a non-zero tf-idf vector has cosine 1 and no length penalty; an
    # order with a zero vector scores 0. Image 1 (4 words, none in image 2): 10 over all four
    # orders. Image 2 (3 words: no 4-grams): 10 * 3/4 = 7.5.
    candidates = ["red cat sits down", "a dog runs"]
    references = [["red cat sits down"] * 2, ["a dog runs"]]
    assert cider_d(candidates, references) == pytest.approx((10 + 7.5) / 2)
    # one image: every n-gram is in all (one) images -> idf log 1 - log 1 = 0 -> score 0
    assert cider_d(candidates[:1], references[:1]) == 0.0
    # a word in both images weighs 0 but the others still give cosine 1
    assert cider_d(["a cat sits down", "a dog runs"], [["a cat sits down"], ["a dog runs"]]) == (
        pytest.approx((10 + 7.5) / 2)
    )


def test_caption_metrics_agree_with_the_single_metrics():
    rng = random.Random(7)
    candidates, references = random_corpus(rng, images=5)
    metrics = caption_metrics(candidates, references)
    assert set(metrics) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"} | {
        "exact_match"
    }
    assert {k: metrics[k] for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4")} == bleu(
        candidates, references
    )
    assert metrics["rouge_l"] == rouge_l(candidates, references)
    assert metrics["cider_d"] == cider_d(candidates, references)


@pytest.mark.parametrize(
    ("candidates", "references", "error", "match"),
    [
        (["a"], [["a"], ["b"]], ValueError, "differ in length"),
        (["a", "b"], [["a"], []], ValueError, r"references\[1\] is empty"),
        ([], [], ValueError, "empty"),
        (["a"], ["a"], TypeError, r"references\[0\] must be a list of str"),
        ("a", [["a"]], TypeError, "list of str"),
    ],
)
def test_bad_inputs_raise_clear_errors(candidates, references, error, match):
    for metric in (bleu, rouge_l, cider_d, caption_metrics):
        with pytest.raises(error, match=match):
            metric(candidates, references)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="max_n"):
        bleu(["a"], [["a"]], max_n=0)
    with pytest.raises(ValueError, match="beta"):
        rouge_l(["a"], [["a"]], beta=0)
    with pytest.raises(ValueError, match="sigma"):
        cider_d(["a"], [["a"]], sigma=0)
