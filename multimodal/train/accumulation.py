"""Gradient accumulation that is exact for contrastive losses: K micro-batches of B train as
ONE batch of K x B, with the activation memory of one micro-batch (GradCache, Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

A contrastive loss couples every pair of the batch, so summing K micro-batch losses (Lightning's
`accumulate_grad_batches`) is a different loss: each sample only sees the B - 1 negatives of its
own micro-batch. `grad_cache` instead

1. embeds every micro-batch without grad and caches the features (K x B rows, a few MB);
   the last micro-batch's forward runs with grad and keeps its graph for step 3;
2. computes the loss ONCE on the concatenated features, made leaf tensors that require grad,
   and takes its gradient with respect to them (and to the shared scalars: logit scale, bias);
3. backpropagates, micro-batch by micro-batch, the surrogate <features_i, cached gradient_i>
   (through the kept graph, or a forward run again with grad), whose parameter gradient is
   micro-batch i's share of the big-batch gradient (chain rule); the K backward passes sum to
   the exact big-batch gradient.

Why not open_clip's `accum_freq`: it also caches features without grad, but then, for each
micro-batch, splices its grad-tracking features into the cache and backpropagates the FULL
loss. That computes the K x B loss K times, and every parameter the loss reaches directly (the
logit scale and bias) collects its gradient K times: K-fold too large unless divided out (and
the re-run forwards draw new dropout masks, so features and cache disagree). Here the loss
runs once and the scalars' gradient is taken once, from that single loss.

The cost is one extra forward pass for K - 1 of the K micro-batches (about +1/4 of the
compute of a step at K = 4 in fp32, where a backward costs about two forwards). Dropout and
other random layers draw the same masks in both passes: the RNG state before a micro-batch's
first forward is restored for its second. Layers whose output depends on the batch
(BatchNorm in training mode) would differ between the passes and break exactness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

MicroBatch = TypeVar("MicroBatch")


class Embedded(NamedTuple):
    """What one micro-batch's forward gives `grad_cache`.

    features: per-sample rows, each (B, ...): concatenated over the micro-batches (K x B, ...)
        before the loss sees them.
    shared: tensors computed from parameters alone (the logit scale, the SigLIP bias): equal in
        every micro-batch, so the loss gets those of the first one.
    local_loss: a term of the total loss that depends on this micro-batch alone (a caption
        cross-entropy), already weighted for the big batch; backpropagated with the surrogate
        in the second pass (ignored in the first).
    """

    features: tuple[Tensor, ...]
    shared: tuple[Tensor, ...] = ()
    local_loss: Tensor | None = None


class GradCacheResult(NamedTuple):
    loss: Tensor  # the loss of the concatenated features (detached)
    features: tuple[Tensor, ...]  # the concatenated features (K x B, ...), detached
    local_loss: Tensor | None  # sum of the micro-batches' local losses (detached)


class _RngState:
    """The CPU (and current CUDA device's) generator state, to replay a forward's random
    draws (dropout masks) exactly."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self.cuda = None if self.cuda_device is None else torch.cuda.get_rng_state()

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block from the saved state; the global state is unchanged afterwards."""
        devices = [] if self.cuda_device is None else [self.cuda_device]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


def _leaf(x: Tensor) -> Tensor:
    """A detached copy at least fp32 (the loss's precision) that requires grad."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32)).requires_grad_()


def _surrogate(outputs: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor | None:
    """sum_j <outputs_j, grads_j>: its gradient with respect to outputs_j is grads_j."""
    terms = [
        (out.to(grad.dtype) * grad).sum()
        for out, grad in zip(outputs, grads, strict=True)
        if grad is not None and out.requires_grad
    ]
    return torch.stack(terms).sum() if terms else None


class _Cached(NamedTuple):
    batch: object
    rng: _RngState
    rows: int


def grad_cache(
    micro_batches: Sequence[MicroBatch],
    forward: Callable[[MicroBatch], Embedded],
    loss_fn: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], Tensor],
    *,
    embed: Callable[[MicroBatch], Embedded] | None = None,
    backward: Callable[[Tensor, bool], None] | None = None,
) -> GradCacheResult:
    """Accumulate into the parameters' `.grad` the exact gradient of
    `loss_fn(concatenated features, shared) + sum of local losses` over all micro-batches,
    holding one micro-batch's activations at a time.

    Args:
        micro_batches: the K micro-batches, in order (the rows of the big batch).
        forward: micro-batch -> `Embedded`, run with grad (the last micro-batch once, the
            others a second time after the loss).
        loss_fn: (features concatenated over micro-batches, shared) -> scalar loss. It may
            gather across ranks (`clip_loss`): under DDP every rank passes its K x B rows.
        embed: the first, no-grad pass over all but the last micro-batch (default:
            `forward`). It must give the same features and shared tensors as `forward`, with
            the same random draws (e.g. `forward` without its local loss).
        backward: (surrogate, is_last) -> None, backpropagates one micro-batch's surrogate
            (default: `surrogate.backward()`); is_last is True for the K-th and final call
            (the one whose backward should synchronise gradients under DDP; it also carries
            the shared tensors' gradient, so its graph reaches every trained parameter).

    Returns:
        the loss, the concatenated features and the summed local losses, all detached.
    """
    if not micro_batches:
        raise ValueError("grad_cache needs at least one micro-batch")
    embed = embed or forward
    backward = backward or (lambda surrogate, is_last: surrogate.backward())

    # 1. features of every micro-batch; no activations kept, except the last micro-batch's:
    # its forward runs with grad and its graph waits for step 3 (K - 1 forwards run twice)
    cached: list[_Cached] = []
    features: list[tuple[Tensor, ...]] = []
    for i, batch in enumerate(micro_batches):
        rng = _RngState()
        if i < len(micro_batches) - 1:
            with torch.no_grad():
                out = embed(batch)
        else:
            kept = out = forward(batch)
        if not out.features:
            raise ValueError("grad_cache needs at least one feature tensor per micro-batch")
        features.append(tuple(f.detach() for f in out.features))
        cached.append(_Cached(batch, rng, out.features[0].shape[0]))

    # 2. the loss once, on leaves: gradients of the features and shared tensors
    leaves = tuple(_leaf(torch.cat(parts)) for parts in zip(*features, strict=True))
    shared_leaves = tuple(_leaf(s) for s in kept.shared)
    with torch.enable_grad():
        loss = loss_fn(leaves, shared_leaves)
        grads = torch.autograd.grad(loss, leaves + shared_leaves, allow_unused=True)
    feature_grads, shared_grads = grads[: len(leaves)], grads[len(leaves) :]
    offsets = [0]
    for item in cached:
        offsets.append(offsets[-1] + item.rows)
    del features

    # 3. backpropagate each micro-batch's slice of the cached gradients: the kept graph
    # first, then the others run again with grad (the same random draws); the last backward
    # (the one to synchronise under DDP) also carries the shared tensors' gradient
    local_total = None
    order = [len(cached) - 1, *range(len(cached) - 1)]
    for n, i in enumerate(order):
        last = n == len(order) - 1
        if n == 0:
            out = kept
            del kept
        else:
            with cached[i].rng.replayed():
                out = forward(cached[i].batch)
        rows = slice(offsets[i], offsets[i + 1])
        surrogate = _surrogate(
            out.features, [None if g is None else g[rows] for g in feature_grads]
        )
        if last:  # the shared tensors' gradient, once
            shared_term = _surrogate(out.shared, shared_grads)
            if shared_term is not None:
                surrogate = shared_term if surrogate is None else surrogate + shared_term
        if out.local_loss is not None:
            surrogate = out.local_loss if surrogate is None else surrogate + out.local_loss
            local = out.local_loss.detach()
            local_total = local if local_total is None else local_total + local
        if surrogate is None or not surrogate.requires_grad:
            raise ValueError("nothing to train: no feature or loss term requires grad")
        backward(surrogate, last)
        del out, surrogate
    return GradCacheResult(loss.detach(), tuple(x.detach() for x in leaves), local_total)
