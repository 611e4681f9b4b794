"""The Lightning side of `accumulate: K` (contrastive-correct accumulation with
`multimodal.train.grad_cache`): manual optimisation that holds K micro-batches, then runs one
optimiser step, one schedule step and gradient clipping for them."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor
from torch.optim import Optimizer

from multimodal.tasks.base import OptimizedTask


class AccumulatingTask(OptimizedTask):
    """An `OptimizedTask` that can train K consecutive micro-batches as one batch.

    With K > 1 the task optimises manually: `collect` keeps each micro-batch until the K-th
    (or the epoch's last) arrives, the task computes the big-batch gradient (`grad_cache`),
    backpropagating through `backward_micro_batch`, and `optimizer_step_once` steps the
    optimiser, its schedule and the Trainer's gradient clipping once. The schedule and
    `max_steps` count optimiser steps (ceil(batches / K) per epoch). Under DDP gradients are
    all-reduced once per optimiser step, in the last micro-batch's backward. Tasks call
    `init_accumulation(K)` in `__init__` and log once per optimiser step; the loggers' step
    axis still counts batches (Lightning's manual optimisation), repeating the last values
    on the K - 1 batches between steps.
    """

    accumulate: int = 1
    _clip_val: float | None = None  # the Trainer's gradient_clip_val, applied by the task

    def init_accumulation(self, accumulate: int) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate={accumulate} must be >= 1")
        self.accumulate = accumulate
        self._micro_batches: list[Any] = []
        if accumulate > 1:
            self.automatic_optimization = False

    # ------------------------------------------------------------------ trainer checks

    def configure_callbacks(self) -> Any:
        # the first hook of `fit` that sees the Trainer, before Lightning validates the run
        # (manual optimisation refuses Trainer-side clipping and accumulation)
        if self.accumulate > 1:
            trainer = self.trainer
            if trainer.accumulate_grad_batches > 1:
                raise ValueError(
                    f"accumulate={self.accumulate} and trainer.accumulate_grad_batches="
                    f"{trainer.accumulate_grad_batches} both accumulate: set only the task's "
                    "accumulate (it makes the contrastive loss see all K x B samples at once)"
                )
            if trainer.gradient_clip_val:  # the task clips, once per optimiser step
                self._clip_val = trainer.gradient_clip_val
                trainer.gradient_clip_val = None
        return super().configure_callbacks()

    def teardown(self, stage: str) -> None:
        if self._clip_val is not None:  # give the Trainer its setting back
            self.trainer.gradient_clip_val = self._clip_val
            self._clip_val = None
        super().teardown(stage)

    def optimizer_steps(self) -> float:
        """The run's optimiser steps for the schedule: the Trainer's estimate of batches,
        ceil(batches / K) per epoch."""
        trainer = self.trainer
        estimate = trainer.estimated_stepping_batches  # also sets the training data up
        if self.accumulate == 1 or trainer.max_epochs == -1:
            return estimate  # infinite epochs: max_steps, already in optimiser steps
        batches = trainer.num_training_batches
        if batches == float("inf"):
            return estimate  # streamed data: max_steps
        steps = math.ceil(batches / self.accumulate) * max(trainer.max_epochs or 1, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    # ------------------------------------------------------------------ the K micro-batches

    def on_train_epoch_start(self) -> None:
        self._micro_batches = []
        super().on_train_epoch_start()

    def collect(self, batch: Any, batch_idx: int) -> list[Any] | None:
        """Keep `batch`; the K held micro-batches when this is the K-th (or the epoch's last,
        then fewer, as Lightning's accumulation does), else None."""
        self._micro_batches.append(batch)
        trainer = self.trainer
        last = (
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            or batch_idx + 1 >= trainer.num_training_batches
        )
        if len(self._micro_batches) < self.accumulate and not last:
            return None
        batches, self._micro_batches = self._micro_batches, []
        return batches

    def backward_micro_batch(self, loss: Tensor, is_last: bool) -> None:
        """Backpropagate one micro-batch's share; gradients are reduced across ranks only in
        the last one's backward (the others accumulate locally, as under DDP's no_sync)."""
        strategy = self.trainer.strategy
        if is_last or not isinstance(strategy, ParallelStrategy):
            self.manual_backward(loss)
            return
        with strategy.block_backward_sync():  # DDP's no_sync
            self.manual_backward(loss)

    def optimizer_step_once(self) -> None:
        """The one optimiser step of the K micro-batches (clipping in on_before_optimizer_step,
        after the precision plugin unscaled fp16 gradients), then the schedule's step."""
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self._clip_val is not None and not self.automatic_optimization:
            self.clip_gradients(optimizer, gradient_clip_val=self._clip_val)
