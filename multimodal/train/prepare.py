"""What a task's `configure_model` does to its transformer blocks, in the order that composes:
activation checkpointing (inside each block), then compile (of each block's forward), then
FSDP2 sharding (each block, then the task) when the Trainer runs `FSDP2Strategy`."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy

from multimodal.train.checkpointing import apply_activation_checkpointing
from multimodal.train.compile import CompileOptions, check_compile_options, compile_blocks
from multimodal.train.fsdp import FSDP2Strategy, shard_model


@dataclass
class BlockOptions:
    """The per-task switches (constructor arguments of every task).

    grad_checkpointing: recompute each block's activations in backward (less memory).
    compile: `torch.compile` each block's forward, with `compile_backend` and `compile_mode`.
    """

    grad_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        check_compile_options(
            self.compile_backend, self.compile_mode, "compile_backend", "compile_mode"
        )


def prepare_task(task: pl.LightningModule, options: BlockOptions) -> None:
    """Apply `options` to every block of `task`, and shard it when its Trainer's strategy is
    `FSDP2Strategy`; safe to call again (Lightning calls `configure_model` once per stage)."""
    if options.grad_checkpointing:
        apply_activation_checkpointing(task)
    if options.compile:
        compile_blocks(task, CompileOptions(options.compile_backend, options.compile_mode))
    strategy = task._trainer.strategy if task._trainer is not None else None
    if isinstance(strategy, FSDP2Strategy):
        shard_model(task, task.device_mesh["data_parallel"], strategy.options)
    elif isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            "the tasks shard with FSDP2 under multimodal.train.FSDP2Strategy (it calls the "
            "task's steps through the FSDP root); use it instead of ModelParallelStrategy"
        )
