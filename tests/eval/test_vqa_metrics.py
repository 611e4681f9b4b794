"""VQA answer normalisation (the official evaluation script's rules), the soft score, the
official leave-one-annotator-out score, and the VQAAccuracy Metric."""

from __future__ import annotations

import pytest
import torch

from multimodal.data.answers import normalize_answer
from multimodal.eval.vqa_metrics import VQAAccuracy, vqa_accuracy, vqa_accuracy_official

NORMALISED = [
    ("Yes", "yes"),  # case
    ("  red \t and\nblue  ", "red and blue"),  # whitespace, tabs, newlines
    ("yes!", "yes"),  # punctuation away from spaces -> space, then collapsed
    ("red, white", "red white"),  # punctuation next to a space -> deleted
    ("black-and-white", "black and white"),
    ("1,000", "1000"),  # digit,digit anywhere -> punctuation deleted
    ("2.5", "2.5"),  # a period before a digit stays
    ("mr. smith.", "mr smith"),  # other periods go
    ("two dogs", "2 dogs"),  # number words -> digits
    ("Ten", "10"),
    ("none", "0"),
    ("the cat", "cat"),  # articles dropped
    ("a dog and an apple", "dog and apple"),
    ("dont", "don't"),  # contractions restored
    ("isnt it", "isn't it"),
    ("Whats that", "what's that"),
    ("couldnt've", "couldn't've"),
    ("don't", "don't"),
    ("it's", "it's"),  # the apostrophe is not punctuation
]


@pytest.mark.parametrize(("answer", "expected"), NORMALISED)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected
    assert normalize_answer(expected) == expected  # idempotent on normalised answers


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="str"):
        normalize_answer(2)


@pytest.mark.parametrize(("matching", "score"), [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0)])
def test_soft_score_counts_matching_annotators(matching, score):
    # min(#matching / 3, 1); answers are compared normalised ("Two" == "2")
    answers = ["Two"] * matching + ["three"] * (10 - matching)
    assert vqa_accuracy("2", answers) == pytest.approx(score)


def test_soft_score_is_capped_at_one():
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


@pytest.mark.parametrize(
    ("matching", "score"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_official_score_averages_the_leave_one_out_subsets(matching, score):
    # 10 answers, m matching: leaving out one of the m gives min((m-1)/3, 1), one of the
    # 10-m others gives min(m/3, 1); the mean: m=1 -> 9 * 1/3 / 10 = 0.3,
    # m=2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6, m=3 -> (3 * 2/3 + 7) / 10 = 0.9, m=4 -> 1.
    answers = ["Yes."] * matching + ["no"] * (10 - matching)
    assert vqa_accuracy_official("yes", answers) == pytest.approx(score)
    # the same by enumerating the subsets
    subsets = [answers[:i] + answers[i + 1 :] for i in range(10)]
    expected = sum(vqa_accuracy("yes", s) for s in subsets) / 10
    assert vqa_accuracy_official("yes", answers) == pytest.approx(expected)


def test_bad_answers_raise():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match=">= 2 answers"):
        vqa_accuracy_official("yes", ["yes"])
    with pytest.raises(TypeError, match="sequence of str"):
        vqa_accuracy("yes", "yes")


PREDICTIONS = ["yes", "2", "red", "cat", "no"]
ANSWERS = [
    ["yes"] * 3 + ["no"] * 7,
    ["two", "2", "3"],
    ["blue"] * 5,
    ["a cat", "The cat", "dog", "cat"],
    ["No"],
]


@pytest.mark.parametrize("official", [False, True])
def test_metric_over_two_updates_is_the_mean_score(official):
    if official:
        answers = [*ANSWERS[:4], ["No", "no"]]  # the official score needs >= 2 answers
        score = vqa_accuracy_official
    else:
        answers, score = ANSWERS, vqa_accuracy
    metric = VQAAccuracy(official=official)
    metric.update(PREDICTIONS[:2], answers[:2])
    metric.update(PREDICTIONS[2:], answers[2:])
    expected = sum(score(p, a) for p, a in zip(PREDICTIONS, answers, strict=True)) / 5
    assert metric.compute().item() == pytest.approx(expected)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute())


def test_metric_states_sum_across_ranks():
    # what the DDP reduction does (dist_reduce_fx="sum"): merge the states of two "ranks"
    whole = VQAAccuracy()
    whole.update(PREDICTIONS, ANSWERS)
    rank0, rank1 = VQAAccuracy(), VQAAccuracy()
    rank0.update(PREDICTIONS[:3], ANSWERS[:3])
    rank1.update(PREDICTIONS[3:], ANSWERS[3:])
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(whole.compute().item())
    expected = (1 + 2 / 3 + 0 + 1 + 1 / 3) / 5  # by hand from the cases above
    assert whole.compute().item() == pytest.approx(expected)


def test_metric_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="differ in length"):
        VQAAccuracy().update(["yes"], [["yes"], ["no"]])
    with pytest.raises(TypeError, match="list of str"):
        VQAAccuracy().update("yes", [["yes"]])
