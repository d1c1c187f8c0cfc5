"""The order of an epoch: a pure function of the manifest counts and (seed, epoch, rank, world_size,
batch_size, shuffle_buffer); steps 1-5 are described in loader.py's docstring and docs/data.md, section 4.

Shared by both backends (loader.py and dali.py), which is why it lives in a module of its own; `_BatchIds`, the
(epoch, batch) sampler of the webdataset backend, lives here too.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order in which the shards are concatenated in an epoch (step 2)."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)


def stream_slice(counts: list[int], perm: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Global ids at stream positions [lo, hi) when shards are concatenated in `perm` order. Only the shards
    overlapping the range are expanded, so a rank's part costs O(N / W) memory, not O(N)."""
    lens = np.asarray(counts, np.int64)[perm]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)[perm]  # manifest id of each first sample
    ends = np.cumsum(lens)
    s0, s1 = int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(ends, hi, side="left"))
    sel_lens, sel_starts = lens[s0:s1 + 1], starts[s0:s1 + 1]
    first = int(ends[s0] - lens[s0]) if s0 < len(lens) else lo  # stream position of shard s0's first sample
    n = int(sel_lens.sum())
    pos = np.arange(n) - np.repeat(np.cumsum(sel_lens) - sel_lens, sel_lens)
    ids = np.repeat(sel_starts, sel_lens) + pos
    return ids[lo - first: hi - first]


def part_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Stream positions [lo, hi) of rank's part (step 3)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def window_shuffle(part: np.ndarray, seed: int, epoch: int, rank: int, window: int) -> np.ndarray:
    """Permute each window of `window` consecutive samples (step 4)."""
    if window <= 1 or len(part) <= 1:
        return part
    rng = np.random.default_rng([seed, epoch, rank, 0x3B1F])
    n_full = len(part) // window
    keys = rng.random(len(part))
    # Each window's permutation = argsort of its random keys (full windows as rows of one matrix, then the tail).
    idx = np.argsort(keys[:n_full * window].reshape(n_full, window), axis=1) + np.arange(n_full)[:, None] * window
    tail = np.argsort(keys[n_full * window:]) + n_full * window
    return part[np.concatenate([idx.ravel(), tail])]


def epoch_order(counts: list[int], seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                window: int = 1000) -> np.ndarray:
    """Global sample ids (manifest numbering) that rank `rank` reads in `epoch`, in order (steps 1-4 above)."""
    lo, hi = part_bounds(int(sum(counts)), rank, world_size)
    part = stream_slice(counts, shard_order(len(counts), seed, epoch, shuffle), lo, hi)
    return window_shuffle(part, seed, epoch, rank, window) if shuffle else part


def batches_per_epoch(n: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> int:
    if drop_last:
        return (n // world_size) // batch_size
    part = n * (rank + 1) // world_size - n * rank // world_size
    return -(-part // batch_size)


class _BatchIds(Sampler):
    """Yields (epoch, batch) ids from a start position: one epoch (finite) or forever (infinite)."""

    def __init__(self, epoch: int, batch: int, per_epoch: int, infinite: bool):
        self.epoch, self.batch, self.per_epoch, self.infinite = epoch, batch, per_epoch, infinite

    def __iter__(self) -> Iterator[tuple[int, int]]:
        e, b = self.epoch, self.batch
        while True:
            if b >= self.per_epoch:
                if not self.infinite or self.per_epoch == 0:
                    return
                e, b = e + 1, 0
            yield e, b
            b += 1

    def __len__(self) -> int:
        return max(self.per_epoch - self.batch, 0)
