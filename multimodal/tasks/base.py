"""What the tasks share: how their optimiser is built, and one step for training and
validation where the two differ only in the stage name they log under."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from torch import Tensor

from multimodal.tasks.optim import OptimConfig, build_optimizer


class OptimizedTask(LightningModule):
    """A task whose parameters (the model's and any head's) train with `self.optim`: AdamW
    without decay on norms, biases and embeddings, warmup + cosine over the run's steps."""

    optim: OptimConfig

    def configure_optimizers(self) -> dict:
        return build_optimizer(self, self.optim, self.optimizer_steps())

    def optimizer_steps(self) -> float:
        """The run's optimiser steps, the schedule's length (fewer than batches when a task
        accumulates micro-batches)."""
        return self.trainer.estimated_stepping_batches


class StageStepTask(OptimizedTask):
    """A task whose training and validation steps are `_step(batch, stage)` with stage
    "train" or "val" (the loss is returned in training)."""

    def _step(self, batch: Any, stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")
