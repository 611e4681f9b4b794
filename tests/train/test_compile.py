"""Per-block compile (`compile: true` on a task): the compiled CLIP trains to the eager losses,
with activation checkpointing and under bf16-mixed; identical blocks share one graph."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import Tensor
from torch.utils.data import DataLoader

from multimodal.layers import Transformer, TransformerConfig
from multimodal.train import BlockOptions, CompileOptions, compile_blocks
from tests.helpers import quiet_trainer
from tests.train.fsdp_worker import global_batch, tiny_clip_task


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[Tensor] = []

    def on_train_batch_end(self, trainer: Trainer, module: Any, outputs: Any, *args: Any) -> None:
        self.losses.append(outputs["loss"].detach().float().clone())


def train(steps: int = 2, precision: str = "32-true", **options: Any) -> tuple[Tensor, Trainer]:
    task = tiny_clip_task(**options)
    losses = Losses()
    trainer = quiet_trainer(max_steps=steps, precision=precision, callbacks=[losses])
    trainer.fit(task, DataLoader([global_batch()], batch_size=None))
    return torch.stack(losses.losses), trainer


def test_compiled_clip_trains_to_the_eager_losses() -> None:
    eager, _ = train()
    start = time.perf_counter()
    compiled, trainer = train(compile=True, compile_backend="aot_eager", grad_checkpointing=True)
    print(f"2 compiled steps (aot_eager, checkpointed): {time.perf_counter() - start:.1f} s")
    assert len(compiled) == 2 and not torch.equal(eager[0], eager[1])
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    metrics = trainer.callback_metrics
    assert metrics["train/first_step_seconds"] > 0
    assert 0 <= metrics["train/compile_seconds"] <= metrics["train/first_step_seconds"]


def test_compiled_clip_under_bf16_mixed() -> None:
    eager, _ = train(steps=1)
    compiled, _ = train(steps=1, precision="bf16-mixed", compile=True, compile_backend="aot_eager")
    torch.testing.assert_close(compiled, eager, atol=3e-2, rtol=0)


def test_identical_blocks_share_a_graph() -> None:
    graphs = 0

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        nonlocal graphs
        graphs += 1
        return gm.forward

    torch._dynamo.reset()
    stack = Transformer(TransformerConfig(dim=16, n_heads=2, n_layers=6))
    assert compile_blocks(stack, CompileOptions(backend=counting_backend)) == 6
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(stack(x).hidden, stack.eval()(x).hidden)  # eval: eager forward
    # the first block's input needs no grad, the others' do: 2 graphs for 6 blocks
    assert graphs <= 2


def test_options_validate() -> None:
    with pytest.raises(ValueError, match="compile_mode"):
        BlockOptions(compile=True, compile_mode="fastest")
