"""Batch buffers reused across batches (`BatchRing`) and uninitialised uint8 buffers in shared memory.

Used by the webdataset backend's loader (loader.py); see docs/data.md, section 6, for why and what it measured.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch


class BatchRing:
    """Batch buffers reused across batches: shared-memory slots that DataLoader workers fill, or in-process slots.

    A fresh 14 MB batch buffer costs page faults: ~50 us per 96x96x6 sample for a fresh shared-memory segment
    handed between processes on a VM (five times the read itself), and in one process the C allocator returns
    freed batches to the system and faults them in again. The ring allocates `slots` batch buffers per worker
    once. The producer writes a batch into one of its free slots and passes only (worker, slot); the consumer
    side wraps the slot in a tensor and marks the slot free again when the last tensor viewing it is freed (a
    finalizer on the numpy array that owns the tensor's memory), so a batch is never overwritten while anything
    still references it. A producer that finds none of its slots free (the consumer is holding many batches)
    falls back to a fresh buffer, so the ring can never block or hand out live memory.
    """

    def __init__(self, workers: int, slots: int, batch_shape: tuple[int, ...], shared: bool = True):
        self.slots, self.batch_shape = slots, batch_shape
        numel = workers * slots * int(np.prod(batch_shape))
        if shared:  # allocated in shared memory without a copy or zero fill
            self.buf = _shared_uint8((workers, slots, numel // workers // slots))
            self.free = torch.ones(workers, slots, dtype=torch.int32).share_memory_()  # 1 = the producer may write
        else:
            self.buf = torch.empty(workers, slots, numel // workers // slots, dtype=torch.uint8)
            self.free = torch.ones(workers, slots, dtype=torch.int32)
        self._free_np = self.free.numpy()
        self._turn = 0  # next slot a producer tries first (each worker process has its own copy)

    def acquire(self, worker: int) -> int | None:
        """A free slot of `worker` (marked in use), or None when all are taken. Called in the worker."""
        for i in range(self.slots):
            k = (self._turn + i) % self.slots
            if self._free_np[worker, k]:
                self._free_np[worker, k] = 0
                self._turn = k + 1
                return k
        return None

    def slot(self, worker: int, k: int) -> np.ndarray:
        """Slot k of `worker` as flat bytes (the caller shapes it: HWC rows or CHW)."""
        return self.buf[worker, k].numpy()

    def tensor(self, worker: int, k: int, n: int) -> torch.Tensor:
        """The first n samples of a filled slot as a flat uint8 tensor; the slot is freed when that memory is no
        longer used. Called in the main process."""
        per = self.buf.shape[2] // self.batch_shape[0]
        owner = self.buf.numpy()[worker, k, :n * per]  # a fresh ndarray object: torch.from_numpy keeps it alive
        weakref.finalize(owner, self._release, worker, k).atexit = False
        return torch.from_numpy(owner)

    def _release(self, worker: int, k: int) -> None:
        self._free_np[worker, k] = 1

    def __getstate__(self) -> dict[str, Any]:  # spawn start method: the shared tensors travel as handles
        return {k: v for k, v in self.__dict__.items() if k != "_free_np"}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._free_np = self.free.numpy()


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 batch. In a DataLoader worker without a ring slot it is allocated in shared memory,
    as torch's own default_collate does, so the hand-over passes a file descriptor instead of copying."""
    if torch.utils.data.get_worker_info() is not None:
        return _shared_uint8(shape)
    return torch.empty(shape, dtype=torch.uint8)


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory, made as torch's default_collate makes worker batches (no
    copy or zero fill, unlike ``share_memory_()`` on an existing tensor)."""
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).new(storage).resize_(*shape)
