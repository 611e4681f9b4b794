"""Regional compile: `torch.compile` of each transformer block's forward, not of the whole
task. Identical blocks share one compiled graph (torch inlines the module's parameters as
inputs), so a 12-layer tower compiles about as fast as one layer, and the code around the
blocks (losses, gathers, logging, generation) stays eager."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from multimodal.train.blocks import block_forwards

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileOptions:
    """How the blocks are compiled: a `torch.compile` backend ("inductor", "aot_eager",
    "eager", or a backend callable) and mode."""

    backend: str | Callable[..., Any] = "inductor"
    mode: str | None = None

    def __post_init__(self) -> None:
        check_compile_options(
            self.backend, self.mode, "CompileOptions.backend", "CompileOptions.mode"
        )


def check_compile_options(
    backend: Any, mode: str | None, backend_field: str, mode_field: str
) -> None:
    """ValueError naming the field when the backend is empty or the mode unknown."""
    if not backend:
        raise ValueError(f"{backend_field}={backend!r} must name a torch.compile backend")
    if mode not in MODES:
        raise ValueError(f"{mode_field}={mode!r} must be one of {list(MODES)}")


def compile_blocks(model: nn.Module, options: CompileOptions | None = None) -> int:
    """Compile the training forward of every block of `model` (checkpointed or not, set
    before or after); returns how many blocks; idempotent."""
    options = options or CompileOptions()
    count = 0
    for forward in block_forwards(model):
        if forward.compiled is None:
            forward.compiled = torch.compile(
                forward.run, backend=options.backend, mode=options.mode
            )
        count += 1
    return count


class CompileTimer(pl.Callback):
    """Logs the cost of compiling: `train/first_step_seconds` (the first training step,
    compilation included) and `train/compile_seconds` (the first step's time minus the
    second's: what compiling added), with a log line on rank 0."""

    def __init__(self) -> None:
        self._start = 0.0
        self._seconds: list[float] = []  # of the first two training batches

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any
    ) -> None:
        if len(self._seconds) == 2:
            return
        self._seconds.append(time.perf_counter() - self._start)
        if len(self._seconds) == 1:
            module.log("train/first_step_seconds", self._seconds[0], batch_size=1)
            return
        first, second = self._seconds
        module.log("train/compile_seconds", max(first - second, 0.0), batch_size=1)
        rank_zero_info(
            f"compiled blocks: first training step {first:.1f} s, second {second:.2f} s "
            f"(compiling took about {max(first - second, 0.0):.1f} s)"
        )
