"""One rank of the two-process FSDP2 / DDP runs of tests/train/test_fsdp.py.

The test starts this module twice with LOCAL_RANK / WORLD_SIZE / MASTER_PORT set, so
Lightning launches nothing and both ranks run, in one process group:
1. FSDP2 (fp32): 3 steps, the losses, the full gradients of step 0, a distributed checkpoint
   after each step, and how much of each block parameter this rank holds;
2. FSDP2 resumed from the checkpoint after step 2, from different initial weights: step 3;
3. DDP: the same 3 steps;
4. FSDP2 with bf16 parameters / fp32 reduction, CPU offload and activation checkpointing:
   1 step.
With the argument "compile": 2 steps eager under DDP, then with compiled, checkpointed blocks
under DDP and FSDP2.
Each rank's batch is its half of `global_batch()`, the same batch every step. Results go to
OUT/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.tasks import ContrastivePretraining, OptimConfig
from multimodal.train import FSDP2Strategy
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig

WORLD = 2
STEPS = 3


def tiny_clip_task(seed: int = 0, **kwargs: Any) -> ContrastivePretraining:
    """A 2-block ViT and a 2-block causal text tower, seeded."""
    torch.manual_seed(seed)
    image = ViT(ViTConfig(image_size=16, patch_size=4, dim=32, n_layers=2, n_heads=2))
    text_config = TransformerConfig(dim=24, n_layers=2, n_heads=2, causal=True, max_positions=8)
    text = TextEncoder(TextConfig(vocab_size=30, transformer=text_config))
    optim = OptimConfig(lr=2e-3, weight_decay=0.1)
    return ContrastivePretraining(CLIP(image, text, embed_dim=16), optim=optim, **kwargs)


def global_batch(size: int = 8) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1234)
    mask = torch.ones(size, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return {
        "images": torch.randn(size, 3, 16, 16, generator=generator),
        "input_ids": torch.randint(1, 30, (size, 5), generator=generator),
        "attention_mask": mask,
    }


def full(t: Tensor) -> Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class Record(Callback):
    """Training losses of every step and the full gradients of the first."""

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.grads: dict[str, Tensor] = {}

    def on_before_optimizer_step(self, trainer: Trainer, module: Any, optimizer: Any) -> None:
        if not self.grads:  # every rank gathers the same parameters in the same order
            self.grads = {
                n: full(p.grad) for n, p in module.named_parameters() if p.grad is not None
            }

    def on_train_batch_end(self, trainer: Trainer, module: Any, outputs: Any, *args: Any) -> None:
        self.losses.append(outputs["loss"].detach().float().clone())


def fit(
    task: ContrastivePretraining,
    strategy: Any,
    rank: int,
    *,
    max_steps: int = STEPS,
    callbacks: tuple[Callback, ...] = (),
    ckpt_path: Path | None = None,
) -> Record:
    """`STEPS` steps on this rank's half of the global batch, recorded."""
    record = Record()
    half = len(global_batch()["images"]) // WORLD
    local = {k: v[rank * half : (rank + 1) * half] for k, v in global_batch().items()}
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=[record, *callbacks],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    trainer.fit(task, DataLoader([local], batch_size=None), ckpt_path=ckpt_path)
    return record


def compiled_runs(rank: int) -> dict[str, Tensor]:
    """2 steps eager under DDP, then compiled (aot_eager) and checkpointed under DDP and FSDP2."""
    options = {"compile": True, "compile_backend": "aot_eager", "grad_checkpointing": True}
    return {
        "eager/losses": torch.stack(fit(tiny_clip_task(), "ddp", rank, max_steps=2).losses),
        "ddp_compiled/losses": torch.stack(
            fit(tiny_clip_task(**options), "ddp", rank, max_steps=2).losses
        ),
        "fsdp_compiled/losses": torch.stack(
            fit(tiny_clip_task(**options), FSDP2Strategy(), rank, max_steps=2).losses
        ),
    }


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["LOCAL_RANK"])
    if mode == "compile":
        torch.save(compiled_runs(rank), out / f"rank{rank}.pt")
        return
    results: dict[str, Tensor] = {}

    task = tiny_clip_task()
    saver = ModelCheckpoint(out / "ckpt", "{step}", save_top_k=-1, every_n_epochs=1)
    record = fit(task, FSDP2Strategy(), rank, callbacks=(saver,))
    results["fsdp/losses"] = torch.stack(record.losses)
    results |= {f"fsdp/grad/{n}": g for n, g in record.grads.items()}
    block = task.model.image_tower.encoder.blocks[0].attn.qkv.weight
    results["fsdp/block_shard"] = torch.tensor([block.to_local().numel(), block.numel()])

    resumed = fit(tiny_clip_task(seed=1), FSDP2Strategy(), rank, ckpt_path=out / "ckpt/step=2.ckpt")
    results["resumed/losses"] = torch.stack(resumed.losses)

    results["ddp/losses"] = torch.stack(fit(tiny_clip_task(), "ddp", rank).losses)

    mixed = FSDP2Strategy(param_dtype="bfloat16", reduce_dtype="float32", cpu_offload=True)
    record = fit(tiny_clip_task(grad_checkpointing=True), mixed, rank, max_steps=1)
    results["bf16/losses"] = torch.stack(record.losses)
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "fsdp")
