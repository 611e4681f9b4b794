"""What the tasks share: initial weights from another run (`init_from`), hyper-parameters
that rebuild them (`load_from_checkpoint(ckpt)` without arguments), how their optimiser is
built, and one step for training and validation where the two differ only in the stage name
they log under."""

from __future__ import annotations

import inspect
import os
from typing import Any

from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from multimodal.adapt import AdaptConfig, AdaptReport, apply_adaptation
from multimodal.tasks.optim import OptimConfig, build_optimizer
from multimodal.train.compile import CompileTimer
from multimodal.train.init_from import InitReport, load_init_weights
from multimodal.train.prepare import BlockOptions, prepare_task


class BlockwiseTask(LightningModule):
    """A task whose transformer blocks are checkpointed, compiled and sharded (FSDP2) as its
    `block_options` and the Trainer's strategy ask, in `configure_model`."""

    block_options = BlockOptions()  # each task sets its own from its constructor arguments

    def configure_model(self) -> None:
        """Activation checkpointing, compile and FSDP2 sharding of the transformer blocks,
        as `block_options` and the Trainer's strategy ask (`multimodal.train.prepare_task`)."""
        prepare_task(self, self.block_options)

    def configure_callbacks(self) -> list[Callback]:
        """With compile on: `CompileTimer` logs what compiling cost."""
        return [CompileTimer()] if self.block_options.compile else []


class Task(BlockwiseTask):
    """A LightningModule of the platform.

    - `init_weights(init_from, init_strict, init_prefix_map)`, called at the end of each
      task's `__init__`, copies another run's weights into the built task (see
      `multimodal.train.init_from`) and prints what was loaded. A resumed run (`--ckpt_path`)
      then replaces them with its own; a rebuilt task (`load_from_checkpoint`) drops
      `init_from` (`weight_arguments`).
    - `adapt_model(adapt, module)`, called right after `init_weights`, adds LoRA / adapters
      and freezes the base (`multimodal.adapt`), so `init_from` loads base weights into the
      plain model first and a rebuilt task is adapted again before its weights load.
    - Under LightningCLI the whole config section (nested model included) is kept as
      hyper-parameters, so `Task.load_from_checkpoint(ckpt)` rebuilds the task alone.
    """

    weight_arguments = ("init_from",)  # init arguments that only supply initial weights

    def save_hyperparameters(self, *args: Any, ignore: Any = None, **kwargs: Any) -> None:
        """As LightningModule's, except that under LightningCLI nothing is ignored: the
        arguments are then the run's plain config (a model section, not a module object)."""
        if _given_hyperparameters.get() is not None:
            ignore = None
        kwargs.setdefault("frame", inspect.currentframe().f_back)
        super().save_hyperparameters(*args, ignore=ignore, **kwargs)

    def init_weights(
        self,
        init_from: str | os.PathLike | None,
        init_strict: bool = False,
        init_prefix_map: dict[str, str] | None = None,
        module: nn.Module | None = None,
    ) -> InitReport | None:
        """Load `init_from` into `module` (default: the whole task) and print the report;
        nothing without a path."""
        if init_from is None:
            return None
        report = load_init_weights(
            self if module is None else module,
            init_from,
            strict=init_strict,
            prefix_map=init_prefix_map,
        )
        if rank_zero_only.rank == 0:
            print(report.table(), flush=True)
        return report

    def adapt_model(self, adapt: AdaptConfig | None, module: nn.Module) -> AdaptReport | None:
        """Apply `adapt` to `module` (the task's pretrained model; heads outside it keep
        training) and print the summary on rank 0; nothing when `adapt` is None."""
        if adapt is None:
            return None
        report = apply_adaptation(module, adapt)
        if rank_zero_only.rank == 0:
            print(report.summary(), flush=True)
        return report

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """The task of a `multimodal fit` checkpoint, rebuilt from the config it was trained
        with (`multimodal.tasks.load_task`), always read weights-only. Keyword arguments
        (e.g. `model=` for a task built in Python, whose checkpoint keeps no model config)
        go to Lightning's own loading, which they override the saved arguments in."""
        from multimodal.tasks.loading import load_task
        from multimodal.train.checkpoint_file import config_classes

        if weights_only is False:
            raise ValueError("checkpoints are read with weights_only=True only")
        if hparams_file is not None or kwargs:
            import torch

            kwargs.setdefault("init_from", None)
            with torch.serialization.safe_globals(list(config_classes())):
                return super().load_from_checkpoint(
                    checkpoint_path, map_location, hparams_file, strict, True, **kwargs
                )
        task = load_task(checkpoint_path, strict=True if strict is None else strict)
        if not isinstance(task, cls):
            raise TypeError(
                f"checkpoint {str(checkpoint_path)!r} holds a {type(task).__name__}, not a "
                f"{cls.__name__}"
            )
        return task if map_location is None else task.to(map_location)


class OptimizedTask(Task):
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
