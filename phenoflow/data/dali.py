"""NVIDIA DALI backend: `fn.readers.webdataset` with the shards' index files, decoding on the GPU when present.

Same order and resume semantics as the webdataset backend (see loader.py), hence the same batches for the same
seed: per epoch a DALI pipeline reads, sequentially and without its own shuffling, exactly the shards that cover
this rank's part of the epoch's shard stream (steps 1-3 of loader.py), in stream order; this wrapper drops the
samples before the part (or before the resume window) and after it, applies the same window permutation
(step 4) to a buffer of one window of decoded images, and cuts batches of `batch_size` (step 5).
Decoding in the pipeline: raw bytes are reshaped, .npy bytes have their header sliced off, PNGs go through
`fn.decoders.image` (the "mixed" GPU decoder with CUDA) and tiled grayscale PNGs are untiled; then HWC -> CHW.
With CUDA the images leave the pipeline as CUDA uint8 tensors (flips, dequantisation and normalisation are then
`transforms.augment` / `encode` on the GPU); without it, a CPU pipeline (device_id=None) gives CPU tensors.
Labels come from each sample's json on the host. Resident memory: one window of images plus DALI's prefetch queue.
Bad samples: a json member that does not parse or lacks a field, an unknown label or a bad dose goes through
`bad_sample_policy` with the shard and key (from the index) in the message. Damage DALI meets itself (a
truncated tar, a PNG that does not decode, a wrong size) stops its pipeline: a ShardError naming the shards it
was reading, whatever the policy (the webdataset backend or `phenoflow data verify` names the sample). DALI does
not check the per-sample crc32 of the label tables.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import ShardError
from .order import (
    batches_per_epoch,
    part_bounds,
    shard_order,
    stream_slice,
    window_shuffle,
)
from .shards import index_array, read_index
from .vocab import LABEL_GROUPS

if TYPE_CHECKING:
    from .loader import ShardLoader


def _pipeline(paths: list[str], index_paths: list[str], ext: str, shape: tuple[int, int, int], batch: int,
              threads: int, device_id: int | None, npy_header: int) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    h, w, c = shape
    gpu = device_id is not None

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=2)
    def pipe():
        meta, data = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["json", ext],
                                           random_shuffle=False, missing_component_behavior="error", name="reader")
        if ext == "png":
            img = fn.decoders.image(data, device="mixed" if gpu else "cpu",
                                    output_type=types.RGB if c == 3 else types.GRAY)
            if c != 3:  # (H, W*C, 1) tiled -> (H, C, W) -> (C, H, W)
                img = fn.transpose(fn.reshape(img, shape=[h, c, w]), perm=[1, 0, 2])
            else:
                img = fn.transpose(img, perm=[2, 0, 1])
        else:
            if ext == "npy":
                data = data[npy_header:]  # the .npy header of a fixed-shape uint8 array has a fixed length
            img = fn.reshape(data.gpu() if gpu else data, shape=[h, w, c])
            img = fn.transpose(img, perm=[2, 0, 1])
        return meta, img

    p = pipe()
    p.build()
    return p


def _to_torch(tl: Any, gpu: bool) -> torch.Tensor | np.ndarray:
    t = tl.as_tensor()
    if not gpu:
        return np.array(t)  # stays numpy on the host until the batch is assembled
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = torch.empty(tuple(t.shape()), dtype=torch.uint8, device="cuda")
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
    return out


def _npy_header_len(loader: ShardLoader) -> int:
    h, w, c = loader.dataset.shape
    rec = loader.dataset.records[0]
    e = read_index(loader.folder / rec["index"])[0]
    return int(e["npy"][1]) - h * w * c


def dali_batches(loader: ShardLoader, epoch: int, batch: int) -> Iterator[dict[str, Any]]:
    """Batches from (epoch, batch) on, in the webdataset backend's order; finite loaders stop at epoch end."""
    e, b = epoch, batch
    while True:
        if b >= loader.per_epoch:
            if not loader.infinite:
                return
            e, b = e + 1, 0
        yield from _epoch_batches(loader, e, b)
        b = loader.per_epoch


def _epoch_batches(loader: ShardLoader, epoch: int, first_batch: int) -> Iterator[dict[str, Any]]:
    ds = loader.dataset
    B, shape = loader.batch_size, ds.shape
    gpu = torch.cuda.is_available()
    n_total = int(sum(ds.counts))
    perm = shard_order(len(ds.counts), ds.seed, epoch, ds.shuffle)
    lo, hi = part_bounds(n_total, ds.rank, ds.world_size)
    part = stream_slice(ds.counts, perm, lo, hi)
    order = window_shuffle(part, ds.seed, epoch, ds.rank, ds.window) if ds.shuffle else part
    win = ds.window if (ds.shuffle and ds.window > 1) else B
    n_batches = batches_per_epoch(n_total, B, ds.rank, ds.world_size, loader.drop_last)
    p0 = first_batch * B  # first part position to emit
    need_end = min(len(part), n_batches * B)  # part positions [p0, need_end) are emitted
    if p0 >= need_end:
        return
    w0 = (p0 // win) * win  # reading starts at the beginning of the window holding p0 ...
    read_end = min(len(part), -(-need_end // win) * win)  # ... and ends with the window holding the last one
    # Shards (in stream order) covering stream positions [lo + w0, lo + read_end).
    lens = np.asarray(ds.counts, np.int64)[perm]
    ends = np.cumsum(lens)
    s0 = int(np.searchsorted(ends, lo + w0, side="right"))
    s1 = int(np.searchsorted(ends, lo + read_end - 1, side="right"))
    skip = lo + w0 - int(ends[s0] - lens[s0])  # samples of shard s0 before the first one we need
    shards = [ds.records[int(i)] for i in perm[s0:s1 + 1]]
    ext = {"raw": "img", "npy": "npy", "png": "png"}[ds.manifest["encoding"]]
    pipe = _pipeline([str(ds.folder / r["name"]) for r in shards], [str(ds.folder / r["index"]) for r in shards],
                     ext, shape, B, max(1, loader.num_workers), torch.cuda.current_device() if gpu else None,
                     _npy_header_len(loader) if ext == "npy" else 0)
    total = skip + (read_end - w0)
    shard_ends = np.cumsum([int(r["count"]) for r in shards])
    keys: dict[int, list[str]] = {}

    def source(got: int) -> tuple[str, str]:
        """Shard name and key (from its index) of the got-th sample the pipeline read."""
        k = int(np.searchsorted(shard_ends, got, side="right"))
        if k not in keys:
            keys[k] = index_array(ds.folder / shards[k]["index"])[1]
        j = got - (int(shard_ends[k - 1]) if k else 0)
        return shards[k]["name"], keys[k][j]

    def samples() -> Iterator[tuple[torch.Tensor | np.ndarray, bytes, int]]:
        got = 0
        while got < total:
            try:
                metas, imgs = pipe.run()
            except RuntimeError as e:
                raise ShardError(f"DALI backend failed reading shards {[r['name'] for r in shards]}: {e} "
                                 "(the webdataset backend names the bad sample)") from e
            x = _to_torch(imgs, gpu)
            for i in range(len(metas)):
                if got >= total:
                    return
                if got >= skip:
                    yield x[i], np.array(metas[i]).tobytes(), got
                got += 1

    out: list[tuple[torch.Tensor | np.ndarray, dict[str, Any]]] = []
    src = samples()
    emitted = 0  # part positions handed out so far, counted from w0
    for ws in range(w0, read_end, win):
        we = min(ws + win, read_end)
        buf = [next(src) for _ in range(we - ws)]
        # Apply the window permutation: emitted id k sits at the buffer position of that id in stream order.
        stream_ids = part[ws:we]
        srt = np.argsort(stream_ids)
        pos = srt[np.searchsorted(stream_ids[srt], order[ws:we])]
        for j in pos:
            if w0 + emitted >= p0 and w0 + emitted < need_end:
                img, raw, got = buf[int(j)]
                out.append((img, _parse_meta(raw), *source(got)))
            emitted += 1
            while len(out) >= B:
                chunk, out = out[:B], out[B:]
                yield _collate(loader, chunk)
    if out:  # drop_last=False: the short last batch of the part
        yield _collate(loader, out)


def _parse_meta(raw: bytes) -> dict[str, Any] | str:
    """A json member's metadata, or the reason it is unusable (handled per sample by _collate's policy)."""
    try:
        m = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return f"json member does not parse ({e})"
    return m if isinstance(m, dict) else f"json member is a {type(m).__name__}, not an object"


def _collate(loader: ShardLoader, chunk: list[tuple[Any, dict[str, Any] | str, str, str]]) -> dict[str, Any]:
    vocabs = loader.dataset.vocabs
    keep, skipped = [], []
    labels: dict[str, list[int]] = {g: [] for g in LABEL_GROUPS}
    dose, ctrl, keys = [], [], []
    for img, m, shard, key in chunk:
        try:
            if isinstance(m, str):
                raise ValueError(m)  # noqa: TRY004
            lab = {g: vocabs[g].index(str(m[g])) for g in LABEL_GROUPS}
            missing = [f for f in ("dose", "is_control") if f not in m]
            if missing:
                raise KeyError(f"metadata lacks {missing}")
            if m["dose"] is None:
                raise ValueError("dose is null")
            d = float(m["dose"])
            if not np.isfinite(d):
                raise ValueError(f"dose {d} is not finite")
        except (KeyError, ValueError, TypeError) as e:
            msg = f"shard {shard}, key {key}: {e}"
            if loader.dataset.policy == "error":
                raise ShardError(msg) from None
            skipped.append(msg)
            continue
        keep.append(img)
        for g in LABEL_GROUPS:
            labels[g].append(lab[g])
        dose.append(d)
        ctrl.append(bool(m["is_control"]))
        keys.append(str(m.get("key", key)))
    c, h, w = loader.dataset.shape[2], *loader.dataset.shape[:2]
    if not keep:
        image = torch.empty((0, c, h, w), dtype=torch.uint8)
    elif isinstance(keep[0], np.ndarray):
        image = torch.from_numpy(np.stack(keep))
    else:
        image = torch.stack(keep)
    out = {"image": image,
           **{g: torch.tensor(v, dtype=torch.int64) for g, v in labels.items()},
           "dose": torch.tensor(dose, dtype=torch.float32), "is_control": torch.tensor(ctrl, dtype=torch.bool),
           "key": keys}
    if skipped:
        out["_skipped"] = skipped
    return out
