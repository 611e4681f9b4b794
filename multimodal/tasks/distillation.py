"""Distillation tasks: a student trained with its task's own loss plus a loss pulling it
towards a frozen teacher (`multimodal.adapt.distill`).

One mechanism serves every task: `Distillation.training_step` runs the base task's training
step unchanged (its loss, metrics and logs), the student's outputs of that step are recorded
where the base task produces them (`record`), and the subclass turns them and the teacher's
outputs for the same batch into distillation terms:

    loss = hard_weight * (base task's training loss) + weight * distill + feature_weight * feature

Validation is the base task's (the same metrics; the teacher is not run). The teacher is a
`FrozenTeacher`, outside the task's module tree: it is not trained, not in the optimiser and
not in the checkpoints; a checkpoint of a distilled task reloads (`load_task`) by rebuilding
the teacher from its config (`teacher_checkpoint` is read again).
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

from multimodal.adapt.distill import (
    DistillConfig,
    FrozenTeacher,
    clip_distill_loss,
    feature_distill_loss,
    load_teacher,
    soft_target_loss,
)
from multimodal.models.clip import ClipLike, CLIPOutput
from multimodal.models.losses import clip_logits
from multimodal.tasks.contrastive import ContrastivePretraining
from multimodal.tasks.language_modeling import (
    IGNORE,
    CausalLM,
    TextClassifier,
    TokenPredictions,
)
from text import DecoderLM, EncoderLM

Batch = dict[str, Tensor]
Terms = dict[str, tuple[float, Tensor]]  # logged name -> (weight, loss)


class Distillation:
    """Mixin of the distillation tasks (listed before the base task among the bases).

    A subclass calls `init_distillation` after the base task's `__init__`, calls `record`
    with the student's outputs where the base task computes them, and says in
    `distill_terms(batch, recorded)` which losses against the teacher to add.

    Each `__init__` rebinds its `teacher` argument to None before calling the base
    `__init__`: Lightning's `save_hyperparameters` reads the arguments from the constructors'
    frames, and a module there would be deep-copied and pickled into every checkpoint (under
    LightningCLI the config section is stored instead, the teacher's included).
    """

    teacher: FrozenTeacher
    distill: DistillConfig
    hard_name = "hard_loss"  # the logged name of the base task's training loss

    def init_distillation(self, teacher: FrozenTeacher, distill: DistillConfig | None) -> None:
        self.teacher = teacher
        self.distill = distill or DistillConfig()
        self._recorded: Any = None

    def record(self, output: Any) -> None:
        """Keep the student's outputs of this training step for `distill_terms`."""
        if self.training:
            self._recorded = output

    def distill_terms(self, batch: Batch, recorded: Any) -> Terms:
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        self._recorded = None
        hard = super().training_step(batch, batch_idx)  # records the student's outputs
        recorded, self._recorded = self._recorded, None
        if recorded is None:
            raise RuntimeError(f"{type(self).__name__}: the training step recorded no outputs")
        self.teacher.follow(self)
        size = len(batch["input_ids"])
        loss = self.distill.hard_weight * hard
        self.log(f"train/{self.hard_name}", hard.detach(), batch_size=size)
        for name, (weight, term) in self.distill_terms(batch, recorded).items():
            self.log(f"train/{name}", term.detach(), prog_bar=True, batch_size=size)
            loss = loss + weight * term
        self.log("train/total_loss", loss.detach(), batch_size=size)
        return loss


class ClipDistillation(Distillation, ContrastivePretraining):
    """Contrastive pretraining of a (small) CLIP distilled from a frozen CLIP teacher
    (open_clip's `--distill`): the teacher's image-text similarities over the global batch are
    soft targets for the student's (`clip_distill_loss`), optionally with the embeddings
    matched through a learned projection (`feature_distill_loss`).

    Logs `train/contrastive_loss` (the base task's loss, ITM included), `train/distill_loss`,
    `train/feature_loss` (with feature_weight > 0) and `train/total_loss`.

    Args:
        model: the student (`ClipLike`).
        teacher: the teacher as a module (e.g. `OpenCLIP` with a local `checkpoint`). Its
            batches are the student's: same tokenizer ids and image size.
        teacher_checkpoint: or the teacher as a `multimodal fit` checkpoint of a CLIP task
            (its `model` is used); read again when this task is rebuilt from a checkpoint.
        distill: the weights and temperature of the losses.
        **kwargs: `ContrastivePretraining`'s arguments (loss, optim, local_loss, itm_head...);
            not `accumulate` > 1.
    """

    hard_name = "contrastive_loss"

    def __init__(
        self,
        model: ClipLike,
        *,
        teacher: ClipLike | None = None,
        teacher_checkpoint: str | os.PathLike | None = None,
        distill: DistillConfig | None = None,
        **kwargs: Any,
    ) -> None:
        frozen = load_teacher(teacher, teacher_checkpoint, part="model")
        teacher = None  # noqa: F841 -- see `Distillation`
        super().__init__(model, **kwargs)
        if self.accumulate > 1:
            raise ValueError(
                f"accumulate={self.accumulate} is not supported with distillation: use "
                "accumulate=1 (the teacher's logits would need the K x B batch)"
            )
        self.init_distillation(frozen, distill)
        self.feature_projection = (
            nn.Linear(model.embed_dim, frozen.module.embed_dim, bias=False)
            if self.distill.feature_weight > 0
            else None
        )

    def forward(self, batch: Batch) -> CLIPOutput:
        out = super().forward(batch)
        self.record(out)
        return out

    def teacher_logits(self, batch: Batch) -> tuple[CLIPOutput, tuple[Tensor, Tensor]]:
        """The teacher's outputs for this rank's batch and its (logits_per_image,
        logits_per_text) over the global batch, laid out as the student's."""
        self.teacher.follow(self)
        out = self.teacher(batch["images"], batch["input_ids"], batch["attention_mask"])
        logits = clip_logits(
            out.image_features.float(),
            out.text_features.float(),
            out.logit_scale,
            local_loss=self.local_loss,
            gather_with_grad=False,
        )
        return out, logits

    def distill_terms(self, batch: Batch, recorded: CLIPOutput) -> Terms:
        teacher, teacher_logits = self.teacher_logits(batch)
        student_logits = clip_logits(
            recorded.image_features.float(),
            recorded.text_features.float(),
            recorded.logit_scale,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
        )
        distill = clip_distill_loss(
            *student_logits, *teacher_logits, temperature=self.distill.temperature
        )
        terms = {"distill_loss": (self.distill.weight, distill)}
        if self.feature_projection is not None:
            feature = (
                feature_distill_loss(
                    recorded.image_features, teacher.image_features, self.feature_projection
                )
                + feature_distill_loss(
                    recorded.text_features, teacher.text_features, self.feature_projection
                )
            ) / 2
            terms["feature_loss"] = (self.distill.feature_weight, feature)
        return terms


class LogitDistillation(Distillation):
    """Soft targets (Hinton et al. 2015) for tasks that predict classes or tokens: the
    student records (logits, mask of the rows that count) and `teacher_logits(batch)` gives
    the teacher's for the same rows; the term is `soft_target_loss` at the temperature."""

    def teacher_logits(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def distill_terms(self, batch: Batch, recorded: tuple[Tensor, Tensor | None]) -> Terms:
        logits, mask = recorded
        teacher = self.teacher_logits(batch)
        loss = soft_target_loss(logits, teacher, self.distill.temperature, mask)
        return {"distill_loss": (self.distill.weight, loss)}


class CausalLMDistillation(LogitDistillation, CausalLM):
    """A `CausalLM` distilled from a teacher `DecoderLM` of the same vocabulary: KL between
    the next-token distributions at every labelled position (padding and unlabelled
    positions left out).

    Args:
        model: the student decoder.
        teacher: the teacher decoder as a module.
        teacher_checkpoint: or a `multimodal fit` checkpoint of a `CausalLM` (its `model`).
        distill: the weights and temperature of the losses.
        **kwargs: `CausalLM`'s arguments.
    """

    def __init__(
        self,
        model: DecoderLM,
        *,
        teacher: DecoderLM | None = None,
        teacher_checkpoint: str | os.PathLike | None = None,
        distill: DistillConfig | None = None,
        **kwargs: Any,
    ) -> None:
        frozen = load_teacher(teacher, teacher_checkpoint, part="model")
        teacher = None  # noqa: F841 -- see `Distillation`
        super().__init__(model, **kwargs)
        self.init_distillation(frozen, distill)

    def predictions(self, batch: Batch) -> TokenPredictions:
        out = super().predictions(batch)
        self.record((out.logits, out.labels != IGNORE))
        return out

    def teacher_logits(self, batch: Batch) -> Tensor:
        out = self.teacher(batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits[:, :-1]  # position t predicts token t + 1, as the student's


class TextClassifierDistillation(LogitDistillation, TextClassifier):
    """A `TextClassifier` distilled from a teacher classifier with the same classes.

    Args:
        encoder, num_classes: the student, as `TextClassifier`'s.
        teacher: a module mapping (input_ids, attention_mask) to (B, num_classes) logits
            (e.g. a `TextClassifier`).
        teacher_checkpoint: or a `multimodal fit` checkpoint of a `TextClassifier` (the
            task itself is the teacher: its head lives in the task).
        distill: the weights and temperature of the losses.
        **kwargs: `TextClassifier`'s arguments.
    """

    def __init__(
        self,
        encoder: EncoderLM,
        num_classes: int,
        *,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | os.PathLike | None = None,
        distill: DistillConfig | None = None,
        **kwargs: Any,
    ) -> None:
        frozen = load_teacher(teacher, teacher_checkpoint, part=None)
        teacher = None  # noqa: F841 -- see `Distillation`
        super().__init__(encoder, num_classes, **kwargs)
        self.init_distillation(frozen, distill)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = super().forward(input_ids, attention_mask)
        self.record((logits, None))
        return logits

    def teacher_logits(self, batch: Batch) -> Tensor:
        return self.teacher(batch["input_ids"], batch["attention_mask"])
