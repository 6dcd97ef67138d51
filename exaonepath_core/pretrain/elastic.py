"""The data position of a pretraining run, independent of the world size: resume at another number of ranks.

Every epoch is one seeded permutation of the training set, extended cyclically (`order[i % n]`, which is what
`patch_store.rank_indices` pads with). A step of global batch G = world_size * batch_size consumes the next G
positions of that sequence, rank r taking positions r, r + W, r + 2W, ... of them (DistributedSampler's split).
So after k steps of an epoch exactly positions [0, k*G) were seen, whatever the world size, and a run can be
resumed at another world size by continuing from that sample position rather than from a step number.

The step numbering follows the running world size (the schedules are built per step for it), so a resumed run
maps its position to the step of the new layout whose remaining steps cover the rest of the epoch; the epoch's
`offset` (position of its step 0 relative to k*G) records the shift. It is 0 in every epoch that started at the
current world size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from exaonepath_core.data import patch_store


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's seeded permutation of `range(n)` (the one `patch_store.rank_indices` splits across ranks)."""
    return np.asarray(patch_store.rank_indices(n, 0, 1, seed, epoch), dtype=np.int64)


def rank_positions(rank: int, world_size: int, start: int, count: int) -> np.ndarray:
    """Positions in the epoch's sequence that `rank` reads from `start` on: start + rank + world_size * j."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return start + rank + world_size * np.arange(max(count, 0), dtype=np.int64)


def rank_epoch_indices(
    n: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    *,
    steps_per_epoch: int,
    batch_size: int,
    step: int,
    offset: int = 0,
) -> np.ndarray:
    """This rank's sample indices for the rest of `epoch`, from global `step` (whole batches only).

    With offset 0 and step at the epoch's start this is `patch_store.rank_indices(...)[:steps_per_epoch *
    batch_size]`; mid-epoch it skips the batches already trained on without reading them.
    """
    in_epoch = step - epoch * steps_per_epoch
    if not 0 <= in_epoch <= steps_per_epoch:
        raise ValueError(f"step {step} is not in epoch {epoch} ({steps_per_epoch} steps per epoch)")
    order = epoch_order(n, seed, epoch)
    start = offset + in_epoch * batch_size * world_size
    positions = rank_positions(rank, world_size, start, (steps_per_epoch - in_epoch) * batch_size)
    return order[positions % n] if n else positions[:0]


@dataclass(frozen=True)
class DataPosition:
    """Where a run stands: global `step` (numbered for its world size), its `epoch`, and the epoch's `offset`."""

    step: int
    epoch: int
    offset: int = 0
    # the checkpoint's step in its own numbering, where a world-size change renumbered it (its log goes that far)
    saved_step: int | None = None

    @property
    def logged_step(self) -> int:
        """The last step of the log that the checkpoint covers (in the numbering the log was written with)."""
        return self.step if self.saved_step is None else self.saved_step

    def samples_into_epoch(self, steps_per_epoch: int, global_batch: int) -> int:
        """Positions of the epoch's sequence already trained on."""
        return self.offset + (self.step - self.epoch * steps_per_epoch) * global_batch

    def offset_at(self, step: int, steps_per_epoch: int) -> int:
        """The offset of the epoch holding `step` (0 once the run has left the epoch it resumed in)."""
        return self.offset if step // steps_per_epoch == self.epoch else 0


@dataclass(frozen=True)
class Remapped:
    """The outcome of moving a data position to another global batch: the new position and what it costs."""

    position: DataPosition
    samples_into_epoch: int  # positions of the epoch seen before the change (kept)
    unseen_in_epoch: int  # samples of the epoch not seen in it (beyond its last whole batch, as in any epoch)


def remap_position(
    saved: DataPosition,
    *,
    n: int,
    old_steps_per_epoch: int,
    old_global_batch: int,
    new_steps_per_epoch: int,
    new_global_batch: int,
) -> Remapped:
    """Move `saved` to a run with another global batch so the epoch continues where it stopped.

    The epoch goes on from the same sample position; the new step is the one whose remaining steps of the epoch
    cover the rest: as many whole new batches as fit (rounded up when the epoch's sequence, padded as a fresh
    run at the new size would pad it, still holds them, so nothing unseen is left out; else down, leaving fewer
    than one global batch of the epoch unseen, as drop_last does every epoch).
    """
    p = saved.samples_into_epoch(old_steps_per_epoch, old_global_batch)
    epoch = saved.epoch
    epoch_length = new_steps_per_epoch * new_global_batch
    limit = max(n, epoch_length)
    remaining = 0
    if p < epoch_length:
        remaining = math.ceil((epoch_length - p) / new_global_batch)
        if p + remaining * new_global_batch > limit:
            remaining -= 1
    if remaining <= 0:  # the epoch is over at the new size: the next one starts afresh
        next_step = (epoch + 1) * new_steps_per_epoch
        return Remapped(DataPosition(next_step, epoch + 1, 0, saved.step), p, max(0, n - p))
    in_epoch = new_steps_per_epoch - remaining
    offset = p - in_epoch * new_global_batch
    position = DataPosition(epoch * new_steps_per_epoch + in_epoch, epoch, offset, saved.step)
    return Remapped(position, p, max(0, n - (p + remaining * new_global_batch)))
