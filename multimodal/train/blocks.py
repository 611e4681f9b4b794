"""The transformer blocks of a model, and the one place where their forward is changed for
training: recomputed in backward (activation checkpointing) and/or compiled.

A block is an instance of `BLOCK_TYPES`: our `TransformerBlock` (every tower, decoder and
fusion stack of the platform is built from it), Flamingo's `GatedCrossAttention`, and the
blocks of the timm and open_clip models that the platform wraps. Activation checkpointing,
per-block compile and FSDP2 sharding all act on the same list of blocks.

Why a per-instance `forward` and not a wrapper module (torch's `checkpoint_wrapper`, the
`OptimizedModule` of `torch.compile(module)`): a wrapper changes every parameter name (and so
the checkpoint keys) and needs the parent container to be rewritten. Setting `forward` on the
instance keeps the module tree, the state dict and the module's hooks (FSDP2's, the gated
decoder's) as they are: hooks run around the call, the checkpointed/compiled code inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from timm.models.eva import EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import (
    Block,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusion.gated import GatedCrossAttention
from multimodal.layers import TransformerBlock

BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    TransformerBlock,
    GatedCrossAttention,
    Block,  # timm ViT / DeiT
    ResPostBlock,
    ParallelScalingBlock,
    ParallelThingsBlock,
    EvaBlock,
    EvaBlockPostNorm,
    ResidualAttentionBlock,  # open_clip towers and CoCa's decoder
    CustomResidualAttentionBlock,
)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of `BLOCK_TYPES` in `model`, in module order."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, BLOCK_TYPES):
            blocks.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return blocks


class BlockForward:
    """A block's `forward` for training: the class's forward, run under non-reentrant
    activation checkpointing while gradients are recorded, and/or through a compiled
    function. In eval mode the plain forward runs (generation with KV caches would
    recompile at every length).

    An object rather than a closure so that `copy.deepcopy` of the model rebinds it to the
    copied block (`module` is passed to the functions, never captured by them)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.forward: Callable[..., Any] = type(module).forward  # unbound: (module, *args)
        self.checkpointing = False
        self.compiled: Callable[..., Any] | None = None

    def run(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The training forward, without compile: checkpointed when asked and grad is on."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self.forward, module, *args, use_reentrant=False, **kwargs)
        return self.forward(module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.module.training:
            return self.forward(self.module, *args, **kwargs)
        run = self.compiled if self.compiled is not None else self.run
        return run(self.module, *args, **kwargs)


def block_forwards(model: nn.Module) -> Iterator[BlockForward]:
    """The `BlockForward` of every block of `model`, installed on first use."""
    for block in transformer_blocks(model):
        forward = block.__dict__.get("forward")
        if not isinstance(forward, BlockForward):
            forward = BlockForward(block)
            block.forward = forward
        yield forward
