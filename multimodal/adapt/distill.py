"""Knowledge distillation: losses that pull a student towards a frozen teacher (CLIP's
similarity logits, embeddings through a learned projection, soft targets of a classifier or
language model), the logits of a CLIP batch over every rank, and the frozen teacher itself.

The teacher is held by `FrozenTeacher`, a plain object, not an `nn.Module`: a task that keeps
one has no teacher parameters in `parameters()` (so none in its optimiser), in `state_dict()`
(so none in its checkpoints) nor in DDP's buckets, and `task.train()` leaves it in eval mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DistillConfig:
    """How a distilled task weighs its losses; validated on creation.

    loss = hard_weight * (the task's own loss) + weight * (distillation loss)
           + feature_weight * (feature loss, CLIP only)

    `temperature` T softens both distributions (logits / T); the soft losses are multiplied
    by T^2 so their gradients keep their size as T changes (Hinton et al. 2015).
    """

    weight: float = 1.0
    hard_weight: float = 1.0
    temperature: float = 1.0
    feature_weight: float = 0.0

    def __post_init__(self) -> None:
        prefix = "DistillConfig."
        for name in ("weight", "hard_weight", "feature_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}{name}={getattr(self, name)} must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"{prefix}temperature={self.temperature} must be > 0")
        if self.weight == self.hard_weight == self.feature_weight == 0:
            raise ValueError(
                f"{prefix}weight, hard_weight and feature_weight are all 0: nothing to train"
            )


# ---------------------------------------------------------------- losses


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """H(p_teacher, p_student) = -sum_c softmax(t)_c log softmax(s)_c, mean over rows (fp32)."""
    target = teacher_logits.float().softmax(dim=-1)
    return -(target * student_logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


def clip_distill_loss(
    student_logits_per_image: Tensor,
    student_logits_per_text: Tensor,
    teacher_logits_per_image: Tensor,
    teacher_logits_per_text: Tensor,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """open_clip's `--distill` loss (`DistillClipLoss.dist_loss`): the cross-entropy of the
    student's similarity rows against the teacher's, averaged over both directions,

        L = T^2 / 2 * [ H(softmax(t_img / T), softmax(s_img / T))
                        + H(softmax(t_txt / T), softmax(s_txt / T)) ]

    Its minimum (student == teacher) is the teacher's entropy, not 0. At T = 1 it is exactly
    open_clip's. All logits are (rows, columns) with the same layout: (N, N) for the global
    batch, or (B, N) for local rows against gathered columns (`clip_logits(local_loss=True)`).
    """
    if student_logits_per_image.shape != teacher_logits_per_image.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_per_image.shape)} and teacher logits "
            f"{tuple(teacher_logits_per_image.shape)} differ: both must cover the same batch"
        )
    t = temperature
    image = soft_cross_entropy(student_logits_per_image / t, teacher_logits_per_image / t)
    text = soft_cross_entropy(student_logits_per_text / t, teacher_logits_per_text / t)
    return (image + text) / 2 * t**2


def feature_distill_loss(student: Tensor, teacher: Tensor, projection: nn.Module) -> Tensor:
    """Cosine distance between the projected student features and the teacher's,
    L = mean_i [1 - cos(P s_i, t_i)], with P a learned map from the student's width to the
    teacher's (the widths usually differ).

    Args:
        student: (B, D_student) features.
        teacher: (B, D_teacher) features (no gradient needed).
        projection: D_student -> D_teacher (e.g. `nn.Linear(D_student, D_teacher)`).
    """
    projected = projection(student).float()  # (B, D_teacher)
    if projected.shape != teacher.shape:
        raise ValueError(
            f"projected student features {tuple(projected.shape)} do not match the teacher's "
            f"{tuple(teacher.shape)}"
        )
    return (1 - F.cosine_similarity(projected, teacher.float(), dim=-1)).mean()


def soft_target_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Hinton's distillation loss: KL(softmax(t / T) || softmax(s / T)) * T^2, summed over the
    classes and averaged over the rows ("batchmean"); 0 when student == teacher.

    Args:
        student_logits: (..., C), e.g. (B, C) for a classifier or (B, T, V) for a LM.
        teacher_logits: the same shape.
        temperature: T > 0.
        mask: (...) boolean, True where a row counts (LM: the labelled, not padded,
            positions); the mean is over those rows. None: every row.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (another vocabulary or label set?)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    classes = student_logits.shape[-1]
    student = (student_logits.float() / temperature).log_softmax(dim=-1).reshape(-1, classes)
    teacher = (teacher_logits.float() / temperature).log_softmax(dim=-1).reshape(-1, classes)
    per_row = (teacher.exp() * (teacher - student)).sum(dim=-1)  # (rows,)
    if mask is None:
        return per_row.mean() * temperature**2
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask {tuple(mask.shape)} must be the logits' shape without the classes, "
            f"{tuple(student_logits.shape[:-1])}"
        )
    keep = mask.reshape(-1).to(per_row.dtype)
    return (per_row * keep).sum() / keep.sum().clamp(min=1) * temperature**2


# ---------------------------------------------------------------- the teacher


class FrozenTeacher:
    """A teacher network kept frozen and out of the student's module tree.

    Its parameters never require grad, it stays in eval mode and it runs under `no_grad`;
    being a plain attribute of the task (not a submodule), it is not in the task's
    parameters, optimiser, state dict or DDP buckets. `follow(student)` moves it to the
    student's device (and to its parameter dtype under a "-true" precision) before a step;
    it runs inside the student's autocast, so under "bf16-mixed" it computes in bf16 too.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"the teacher must be an nn.Module, got {type(module).__name__}")
        self.module = module.requires_grad_(False).eval()

    def follow(self, student: nn.Module) -> None:
        """Move the teacher to the device and floating dtype of the student's parameters."""
        reference = next(student.parameters(), None)
        mine = next(self.module.parameters(), None)
        if reference is None or mine is None:
            return
        if mine.device != reference.device or mine.dtype != reference.dtype:
            self.module.to(device=reference.device, dtype=reference.dtype)

    def __call__(self, *args, **kwargs):
        """The teacher's forward, without a graph (and in eval mode, whatever was set)."""
        self.module.eval()
        with torch.no_grad():
            return self.module(*args, **kwargs)


def load_teacher(
    teacher: nn.Module | None,
    checkpoint: str | os.PathLike | None,
    *,
    part: str | None = "model",
) -> FrozenTeacher:
    """The frozen teacher: `teacher` as given (a module built from YAML, e.g. an `OpenCLIP`
    with a local checkpoint), or the task of a `multimodal fit` checkpoint rebuilt with
    `load_task` and its `part` taken (`"model"`: the network of CLIP / LM tasks; None: the
    task itself, when the task is the network, as `TextClassifier` is). Exactly one of the two.
    """
    if (teacher is None) == (checkpoint is None):
        raise ValueError(
            "give the teacher as `teacher` (a module) or as `teacher_checkpoint` (a "
            f"`multimodal fit` checkpoint), exactly one; got teacher={type(teacher).__name__} "
            f"and teacher_checkpoint={checkpoint!r}"
        )
    if teacher is None:
        from multimodal.tasks.loading import load_task  # tasks import this module

        task = load_task(checkpoint)
        teacher = task if part is None else getattr(task, part)
    return FrozenTeacher(teacher)
