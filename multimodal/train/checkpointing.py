"""Activation checkpointing of every transformer block: each block's activations are
recomputed in the backward pass (non-reentrant `torch.utils.checkpoint`, inside the block's
forward), so a stack keeps only its block inputs: less memory, the same gradients. Works
under DDP, FSDP2 (FSDP's hooks stay outside the recomputed region) and per-block compile."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from multimodal.train.blocks import block_forwards, transformer_blocks


@runtime_checkable
class HasGradCheckpointing(Protocol):
    """Towers with their own switch (timm models: CNN stages have no transformer blocks)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every block of `model` (`transformer_blocks`); a sub-module without blocks
    that has its own `set_grad_checkpointing` (a timm CNN tower) uses that instead. Returns
    how many blocks and towers were switched on; idempotent."""
    count = 0
    for forward in block_forwards(model):
        forward.checkpointing = True
        count += 1

    def visit(module: nn.Module) -> int:
        if not transformer_blocks(module) and isinstance(module, HasGradCheckpointing):
            module.set_grad_checkpointing(True)
            return 1
        return sum(visit(child) for child in module.children())

    return count + visit(model)
