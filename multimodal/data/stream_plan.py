"""Which samples each reader slot (rank x DataLoader worker) reads in one epoch.

The plan is what makes an epoch of a finite shard stream one pass: with the sample count of
every shard known (from the writer's manifests, or counted from the tar headers), the shards
are laid end to end in an order reshuffled each epoch (seeded, the same on every rank), and
this virtual sequence of samples is cut into contiguous ranges:

- ranks get balanced ranges (their sample counts differ by at most one);
- in training under several ranks, every rank steps the same number of full batches: a rank
  short of a whole batch is padded with the first samples of the next rank's range (at most
  one batch of padding per rank; padding never repeats a sample of the same rank, so a batch
  never holds a sample twice);
- within a rank, workers get contiguous runs of whole batches, so a shard is read by at most
  the two slots whose ranges meet inside it (shards stay the unit of I/O; a slot skips the
  samples before its range by index, without decoding them).

With `epoch_length` the virtual sequence is several passes long (each pass reshuffled) and
cut to `world_size * epoch_length * batch_size` samples. Everything here is a pure function of
(shard counts, seed, epoch, rank, worker), so a resumed run recomputes the same plan.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Samples `start <= i < stop` (by position in the tar) of shard number `shard`."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class SlotPlan:
    """What one slot reads in an epoch.

    Attributes:
        segments: the shard ranges, in reading order.
        batches: batches this slot yields; in training under several ranks every one is full.
        full_batches: whether every batch must hold exactly `batch_size` items (training under
            several ranks: feature gathers need equal shapes); else the last may be partial.
    """

    segments: tuple[Segment, ...]
    batches: int
    full_batches: bool

    @property
    def samples(self) -> int:
        return sum(s.stop - s.start for s in self.segments)


def shard_order(n_shards: int, seed: int | str, epoch: int, pass_: int, shuffle: bool) -> list[int]:
    """The shard order of one pass: shuffled by (seed, epoch, pass), the same on every rank."""
    order = list(range(n_shards))
    if shuffle:
        random.Random(f"{seed}:{epoch}:{pass_}:shards").shuffle(order)
    return order


def virtual_segments(
    counts: Sequence[int], start: int, stop: int, *, seed: int, epoch: int, shuffle: bool
) -> list[Segment]:
    """Positions [start, stop) of the epoch's virtual sequence (passes of all shards end to end,
    each pass in its own order) as shard segments."""
    total = sum(counts)
    if total <= 0:
        raise ValueError("the shards hold no samples")
    segments: list[Segment] = []
    position = start
    while position < stop:
        base = (position // total) * total
        for shard in shard_order(len(counts), seed, epoch, position // total, shuffle):
            first, last = base, base + counts[shard]
            base = last
            if last <= position:
                continue
            if first >= stop:
                break
            lo, hi = max(first, position), min(last, stop)
            segments.append(Segment(shard, lo - first, hi - first))
            position = hi
    return _merge(segments)


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].shard == segment.shard and merged[-1].stop == segment.start:
            merged[-1] = Segment(segment.shard, merged[-1].start, segment.stop)
        else:
            merged.append(segment)
    return merged


def balanced(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` balanced runs."""
    size, extra = divmod(total, parts)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def _slice_ranges(ranges: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """Positions [start, stop) of the list formed by concatenating `ranges`."""
    out, offset = [], 0
    for lo, hi in ranges:
        length = hi - lo
        a, b = max(start - offset, 0), min(stop - offset, length)
        if a < b:
            out.append((lo + a, lo + b))
        offset += length
    return out


def rank_ranges(
    total: int, *, rank: int, world_size: int, batch_size: int, training: bool, drop_last: bool
) -> tuple[list[tuple[int, int]], int, bool]:
    """(the virtual ranges rank `rank` reads, its number of batches, whether all are full) for
    a one-pass epoch of `total` samples."""
    start, stop = balanced(total, world_size, rank)
    mine = [(start, stop)] if stop > start else []
    n = stop - start
    if not training or world_size == 1:
        if drop_last:
            batches = n // batch_size
            return _slice_ranges(mine, 0, batches * batch_size), batches, True
        return mine, math.ceil(n / batch_size), False
    smallest = total // world_size
    if drop_last:
        batches = smallest // batch_size
        return _slice_ranges(mine, 0, batches * batch_size), batches, True
    batches = math.ceil(math.ceil(total / world_size) / batch_size)
    padding = batches * batch_size - n
    if padding:  # the first samples after this rank's range, wrapping around the epoch
        begin = stop % total
        end = begin + padding
        mine += [(begin, min(end, total))] + ([(0, end - total)] if end > total else [])
    return mine, batches, True


def plan_slot(
    counts: Sequence[int],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    training: bool,
    drop_last: bool = False,
    epoch_length: int | None = None,
) -> SlotPlan:
    """The plan of slot (rank, worker) in `epoch` (see the module docstring)."""
    total = sum(counts)
    if epoch_length is not None:
        per_rank = epoch_length * batch_size
        ranges = [(rank * per_rank, (rank + 1) * per_rank)]
        batches, full = epoch_length, True
    else:
        ranges, batches, full = rank_ranges(
            total,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            training=training,
            drop_last=drop_last,
        )
    first, last = balanced(batches, num_workers, worker)  # whole batches per worker
    length = sum(hi - lo for lo, hi in ranges)
    mine = _slice_ranges(ranges, first * batch_size, min(last * batch_size, length))
    segments: list[Segment] = []
    for lo, hi in mine:
        segments += virtual_segments(counts, lo, hi, seed=seed, epoch=epoch, shuffle=shuffle)
    return SlotPlan(tuple(segments), last - first, full)


def worker_batches(batches: int, num_workers: int, worker: int) -> int:
    """How many of a rank's `batches` worker `worker` yields (workers take balanced runs)."""
    first, last = balanced(batches, num_workers, worker)
    return last - first
