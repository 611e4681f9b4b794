"""VQA accuracy: the soft score against the annotators' answers, and a torchmetrics Metric.

Two definitions are in use (Antol et al. 2015; Goyal et al. 2017):

- `vqa_accuracy`, the common one (and the training target of the datamodules):
  ``min(#annotators whose answer equals the prediction / 3, 1)``;
- `vqa_accuracy_official`, what the official evaluation script reports: the mean of that score
  over the N leave-one-annotator-out subsets of N-1 answers. With 10 answers of which m match,
  m = 0, 1, 2, 3, >= 4 score 0, 0.3, 0.6, 0.9, 1 (against 0, 1/3, 2/3, 1, 1 above).

Both compare answers after `normalize_answer` (the official script's processing). The official
script normalises the prediction fully but the annotators' answers only partly (punctuation,
and only when they disagree) because VQA's released answers are already normalised; we
normalise every answer the same way: identical on VQA's answers (normalising is idempotent
on them), and right on data that was never normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from multimodal.data.answers import normalize_answer

__all__ = ["VQAAccuracy", "vqa_accuracy", "vqa_accuracy_official"]

ANNOTATORS_FOR_FULL_SCORE = 3


def _matches(prediction: str, answers: Sequence[str]) -> list[bool]:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
        raise TypeError(f"answers must be a sequence of str, got {answers!r}")
    if len(answers) == 0:
        raise ValueError("answers is empty: a question needs at least one annotator answer")
    predicted = normalize_answer(prediction)
    return [normalize_answer(a) == predicted for a in answers]


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """``min(#answers equal to the prediction / 3, 1)``, compared after `normalize_answer`."""
    return min(sum(_matches(prediction, answers)) / ANNOTATORS_FOR_FULL_SCORE, 1.0)


def vqa_accuracy_official(prediction: str, answers: Sequence[str]) -> float:
    """The official script's score: the mean over each annotator left out of
    ``min(#other answers equal to the prediction / 3, 1)``. Needs >= 2 answers."""
    matches = _matches(prediction, answers)
    if len(matches) < 2:
        raise ValueError(f"the leave-one-out score needs >= 2 answers, got {len(matches)}")
    total = sum(matches)
    scores = [min((total - m) / ANNOTATORS_FOR_FULL_SCORE, 1.0) for m in matches]
    return sum(scores) / len(scores)


class VQAAccuracy(Metric):
    """Mean VQA soft score over questions; correct under DDP (sums reduced across ranks).

    Args:
        official: score with `vqa_accuracy_official` instead of `vqa_accuracy`.

    `compute()` before any `update` returns nan.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score_sum: Tensor
    count: Tensor

    def __init__(self, official: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.official = official
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        """One predicted answer per question and the annotators' answers of each question."""
        if isinstance(predictions, str):
            raise TypeError("predictions must be a list of str (one per question), got a str")
        if len(predictions) != len(answers):
            raise ValueError(
                f"predictions and answers differ in length: {len(predictions)} != {len(answers)}"
            )
        score = vqa_accuracy_official if self.official else vqa_accuracy
        self.score_sum += sum(score(p, a) for p, a in zip(predictions, answers, strict=True))
        self.count += len(predictions)

    def compute(self) -> Tensor:
        """The mean soft score (float64 scalar)."""
        return self.score_sum / self.count
