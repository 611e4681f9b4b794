"""Feature gathering across DDP ranks for losses that compare every pair in the global batch.

All functions are the identity (or return rank 0 of 1) when `torch.distributed` is not
initialised, so the same loss code runs in a notebook, on one device and under DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: Tensor, *, with_grad: bool = True) -> Tensor:
    """Concatenate the (B, D) features of every rank along dim 0, in rank order -> (W * B, D).

    Every rank must hold the same B (all_gather needs equal shapes; use `drop_last=True` or equal
    shard sizes).

    Args:
        x: local features (B, D).
        with_grad: if True the gather is autograd-aware: the gradient that *every* rank computes
            for slice r is summed and sent back to rank r (so a loss computed identically on all
            ranks, then averaged by DDP, gives the single-process gradient). If False the
            gathered copies are constants and only the local slice keeps its graph (as open_clip
            does); gradients then miss the other ranks' contributions.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x
    if with_grad:
        # torch.distributed.nn.functional.all_gather is autograd-aware: its backward is a
        # reduce-scatter (SUM) of the incoming gradients (all_to_all + sum on gloo).
        return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x  # keep the local graph in its slot
    return torch.cat(parts, dim=0)
