"""Deterministic, exactly-once, resumable streaming of shard folders into training and evaluation batches.

Order of an epoch (a pure function of the manifest counts and seed, epoch, rank, world_size, batch_size):
  1. the split's N samples are numbered 0..N-1 in manifest order (shard by shard, sample by sample);
  2. shuffle=True: the shards are permuted by a generator seeded with (seed, epoch) and their samples
     concatenated in that order; shuffle=False: manifest order;
  3. rank r of W takes the contiguous part [N r // W, N (r + 1) // W) (parts differ by at most one sample);
  4. shuffle=True: the part is cut into windows of `shuffle_buffer` consecutive samples and each window is
     permuted by a generator seeded with (seed, epoch, rank): samples move at most one window, so reads stay
     local (a window spans one or two shards) and memory stays bounded;
  5. batch b is samples [b B, (b + 1) B) of the part.
Uneven last part policy: drop_last=True yields the same number of full batches on every rank,
floor(floor(N / W) / B); the few samples beyond it are left out of this epoch only (a different set each epoch
when shuffling). drop_last=False yields every sample of the epoch exactly once over all ranks; the last batch of a
rank may be short and ranks may differ by one batch (use it for evaluation, not for lock-step training).

Every batch is computed independently from (epoch, b), reading only its own samples through the per-shard
index (byte offsets), so DataLoader workers (which take batches round-robin and return them in order) never
change the order, and resuming is a jump: ``state_dict()`` records (epoch, batches yielded in this epoch) and a
loader given ``load_state_dict(state)`` yields exactly the next batch.

Integrity: every failure to read or decode a sample (a truncated tar, bytes of the wrong size, a PNG or .npy
that does not decode, a wrong shape or dtype, bad labels, an image whose crc32 differs from its label table's)
is a ShardError naming the shard and the key, handled by `bad_sample_policy` ("error" raises, "skip" leaves
the sample out, counted and logged). `checksums` says when image bytes are checked against the crc32 the
writer recorded: "first_pass" (default: each sample once per loader, until it has passed), "always", "off".
The order functions live in order.py and the batch ring in ring.py (re-exported here); the dataset that reads
the batches, `ShardBatches`, in shard_batches.py.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .order import (  # noqa: F401  re-exported: callers import the order functions from here
    _BatchIds,
    batches_per_epoch,
    epoch_order,
    part_bounds,
    shard_order,
    stream_slice,
    window_shuffle,
)
from .ring import BatchRing
from .shard_batches import ShardBatches
from .shards import load_manifest
from .vocab import Vocab

log = logging.getLogger("phenoflow.data")
STATE_VERSION = 1


def _identity(x: Any) -> Any:
    return x


class ShardLoader:
    """Iterate batches of a shard folder's split (see the module docstring for order and resume semantics).

    A batch is {image: uint8 (B, C, H, W), perturbation/experiment/cell_type: int64 (B,), dose: float32 (B,),
    is_control: bool (B,), key: list[str]}. With bad_sample_policy="skip", bad samples are left out of their
    batch (which is then shorter), counted in ``skipped`` and logged with shard and key. ``channels_last=True``
    (webdataset backend) skips the HWC -> CHW copy: `image` is then a (B, C, H, W) view with channels-last
    strides (same values; `.contiguous()` or the trainer's move to the GPU makes it dense), a third of the CPU
    cost of raw data. ``checksums`` ("first_pass", "always", "off"; webdataset backend) says when image bytes
    are checked against the crc32 in the shard's label table: a mismatch is a bad sample (ChecksumError).
    The DALI backend reads the tar members itself and does not check them (`phenoflow data verify` does).
    """

    def __init__(self, manifest_dir: str | Path, split: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 infinite: bool = True, backend: str = "webdataset", bad_sample_policy: str = "error",
                 shuffle_buffer: int = 1000, prefetch_factor: int = 2, channels_last: bool = False,
                 checksums: str = "first_pass"):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if backend not in ("webdataset", "dali"):
            raise ValueError(f"backend={backend!r} must be 'webdataset' or 'dali'")
        self.folder, self.split, self.batch_size = Path(manifest_dir), split, batch_size
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, seed
        self.shuffle, self.drop_last, self.infinite, self.backend = shuffle, drop_last, infinite, backend
        self.prefetch_factor = prefetch_factor
        cls = ShardBatches
        if load_manifest(manifest_dir).get("modality") == "expression":  # same order, state and policies
            from .expression_loader import ExpressionBatches as cls
            if backend != "webdataset":
                raise ValueError(f"{manifest_dir}: expression shards are read by the webdataset backend only")
        self.dataset = cls(manifest_dir, split, batch_size, rank, world_size, seed, shuffle,
                           shuffle_buffer, bad_sample_policy, channels_last=channels_last,
                           checksums="off" if backend == "dali" else checksums)
        self.manifest = self.dataset.manifest
        if backend == "dali" and checksums != "off":
            log.info("%s: the DALI backend does not check per-sample checksums (DALI reads the tar members "
                     "itself); `phenoflow data verify %s` checks every sample", self.folder, self.folder)
        self.num_samples = int(self.dataset.starts[-1])
        self.per_epoch = batches_per_epoch(self.num_samples, batch_size, rank, world_size, drop_last)
        if infinite and self.per_epoch == 0:
            raise ValueError(f"split {split!r} has {self.num_samples} samples: too few for one batch of "
                             f"{batch_size} per rank with world_size={world_size} (drop_last={drop_last})")
        self.epoch, self.batch = 0, 0
        self.skipped = 0
        self.skipped_log: list[str] = []  # the last 1000 skip messages
        self._kept: tuple[Any, Any, Any] | None = None  # a finished finite pass's (DataLoader, sampler, ring)

    @property
    def vocabs(self) -> dict[str, Vocab]:
        return self.dataset.vocabs

    @property
    def channels(self) -> list[str]:
        return list(self.manifest.get("channels", []))

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.per_epoch

    # -- resume -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch,
                "samples_in_epoch": self.batch * self.batch_size, "skipped": self.skipped, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "num_samples": self.num_samples, "shuffle": self.shuffle, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "rank", "world_size", "batch_size", "num_samples", "shuffle", "split"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"loader state was saved with {k}={state[k]!r}, this loader has "
                                 f"{k}={getattr(self, k)!r}: exact resume needs the same value")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped = int(state.get("skipped", 0))

    # -- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch >= self.per_epoch and not self.infinite:
            self.epoch, self.batch = self.epoch + 1, 0  # a finished finite epoch: this pass is the next one
        if self.backend == "dali":
            from .dali import dali_batches

            source = dali_batches(self, self.epoch, self.batch)
        else:
            kept, self._kept = self._kept, None
            if kept is not None:  # the previous finite pass ended: its workers (and their caches) serve this one
                dl, sampler, ring = kept
                sampler.epoch, sampler.batch = self.epoch, self.batch
            else:
                sampler = _BatchIds(self.epoch, self.batch, self.per_epoch, self.infinite)
                shape = self.dataset.ring_shape(self.batch_size)
                # Ring slots in this process: the batch being read, the caller's, the previous one. Per worker:
                # its prefetched batches, the one being consumed, the consumer's previous one, and one spare;
                # when the consumer holds more, workers fall back to fresh segments.
                ring = None if shape is None else \
                    BatchRing(1, 3, shape, shared=False) if self.num_workers == 0 else \
                    BatchRing(self.num_workers, self.prefetch_factor + 3, shape)
                dl = None
            if self.num_workers == 0:
                source = (self.dataset.fetch(item, ring) for item in sampler)
            else:
                if dl is None:
                    # A private generator: DataLoader draws its workers' base seed when the iterator starts, and
                    # from the global torch generator that would shift the trainer's per-step draws after a
                    # resume. A finite loader keeps its workers from one pass to the next (persistent), so that
                    # their shard tables, maps and open files are built once, not every epoch; an infinite one
                    # never ends its pass.
                    dl = DataLoader(self.dataset, batch_size=None, sampler=sampler,
                                    num_workers=self.num_workers, collate_fn=_identity,
                                    prefetch_factor=self.prefetch_factor, persistent_workers=not self.infinite,
                                    generator=torch.Generator().manual_seed(self.seed))
                self.dataset.ring = ring  # workers start (and copy the dataset) in the first iter(dl)
                source = iter(dl)
                self.dataset.ring = None
        for out in source:
            if self.backend != "dali":
                out = self.dataset.to_batch(out, ring)
            skipped = out.pop("_skipped", None)
            if skipped:
                self.skipped += len(skipped)
                for msg in skipped:
                    log.warning("skipped bad sample (%s total): %s", self.skipped, msg)
                self.skipped_log = (self.skipped_log + skipped)[-1000:]
            # The state counts batches handed to the caller (not those prefetched by workers).
            self.batch += 1
            if self.batch >= self.per_epoch and self.infinite:
                self.epoch, self.batch = self.epoch + 1, 0
            yield out
            del out  # the caller's reference is the only one left: a ring slot is free once the caller drops it
        if self.backend != "dali" and self.num_workers > 0 and not self.infinite:
            # The pass ran to its end (nothing prefetched is outstanding): the next pass may reuse the workers. A
            # pass abandoned early keeps nothing: its DataLoader, and the workers, go with this generator.
            self._kept = (dl, sampler, ring)
