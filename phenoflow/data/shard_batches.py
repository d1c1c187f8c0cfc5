"""`ShardBatches`: the map-style dataset behind `ShardLoader` (loader.py). Item (epoch, b) is batch b of that
epoch for one rank, read through each shard's index (byte offsets) and label table; raw images go straight from
the page cache into the batch (one preadv per sample), other encodings through their decoders. Per-process
caches (open files, indexes, tables) live in each DataLoader worker's copy; checksum flags are shared. Every
failure is a ShardError naming shard and key, raised or counted and skipped by the bad-sample policy.
Expression folders use the subclass in expression_loader.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ChecksumError, MissingShardError, ShardError, bad_sample
from .order import batches_per_epoch, epoch_order
from .ring import BatchRing, _batch_buffer, _shared_uint8
from .shards import (
    ENCODINGS,
    EXT_TO_ENCODING,
    decode_image,
    index_array,
    load_manifest,
    manifest_vocabs,
    split_shards,
)
from .tables import CHECKSUM, LabelTable, label_columns, payload_crc, read_label_table
from .vocab import LABEL_GROUPS, UnknownLabelError, Vocab

log = logging.getLogger("phenoflow.data")
CHECKSUM_POLICIES = ("first_pass", "always", "off")
_RAW_EXT = list(EXT_TO_ENCODING).index(ENCODINGS["raw"])  # ext code of raw images in the index arrays

_json_decode = json.JSONDecoder().raw_decode


def _read_raw_into(fd: int, entry: list[int], out: np.ndarray, scratch: bytearray,
                   shape: list[int]) -> dict[str, Any] | None:
    """Fast path for a raw image stored after its json (the writer's order). One preadv puts the json and the tar
    header between the two members into `scratch` and the image bytes straight into `out` (a row of the batch),
    so the image is copied once, from the page cache into the batch. Returns the metadata, or None when the
    sample does not fit this path (another encoding or member order, a size or shape that does not match, a
    short read, bad json); ``ShardBatches.read`` then decodes it or raises the error naming shard and key."""
    jo, js, io_, is_, ext = entry
    if ext != _RAW_EXT or jo < 0 or io_ < jo + js or is_ != out.nbytes:
        return None
    gap = io_ - jo
    if gap > len(scratch):
        scratch.extend(bytes(gap - len(scratch)))
    if os.preadv(fd, [memoryview(scratch)[:gap], out], jo) != gap + is_:
        return None
    try:
        text = scratch[:js].decode()
        meta, end = _json_decode(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        return None
    if end != len(text) or not isinstance(meta, dict) or meta.get("shape", shape) != shape:
        return None
    return meta


class ShardBatches(Dataset):
    """Map-style dataset whose item (epoch, b) is batch b of that epoch for one rank, read through shard indexes.
    Expression folders use the subclass in expression_loader.py (same order, caches, checks and policies)."""

    payload, exts = "image", tuple(EXT_TO_ENCODING)  # what a sample's payload member holds, its extensions
    row_lists = True  # _index also keeps each shard's rows as Python lists (the per-sample loop reads those)

    def __init__(self, folder: str | Path, split: str, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, window: int, bad_sample_policy: str = "error", cache_shards: int = 32,
                 channels_last: bool = False, checksums: str = "first_pass"):
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.split = split
        self.records = split_shards(self.manifest, split)
        self.counts = [int(r["count"]) for r in self.records]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.shape = tuple(self.manifest.get("image_shape", ()))  # () for expression folders
        self._shape_list = list(self.shape)
        self.vocabs: dict[str, Vocab] = manifest_vocabs(self.manifest)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.window = seed, shuffle, window
        if bad_sample_policy not in ("error", "skip"):
            raise ValueError(f"bad_sample_policy={bad_sample_policy!r} must be 'error' or 'skip'")
        if checksums not in CHECKSUM_POLICIES:
            raise ValueError(f"checksums={checksums!r} must be one of {list(CHECKSUM_POLICIES)}")
        self.policy, self.checksums = bad_sample_policy, checksums
        # first_pass: one flag per sample, in shared memory so that DataLoader workers (which read disjoint
        # batches) share what has been checked; a sample is marked once it has passed.
        self._verified = _shared_uint8((int(self.starts[-1]),)).zero_() if checksums == "first_pass" else None
        unchecked = [r["name"] for r in self.records if r.get("checksum") != CHECKSUM]
        if unchecked and checksums != "off":  # logged once, here in the main process
            log.warning("%s: %d of %d shards of split %r (e.g. %s) have no per-sample checksums (written before "
                        "they existed): their image bytes are read unchecked. `phenoflow data verify %s` checks "
                        "them against the manifest's sha256; `phenoflow data labels %s` then adds checksums.",
                        self.folder, len(unchecked), len(self.records), split, unchecked[0], self.folder,
                        self.folder)
        self.cache_shards, self.channels_last = cache_shards, channels_last
        self._order: tuple[int, np.ndarray] | None = None
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._indexes: OrderedDict[int, tuple[np.ndarray, list[str], list[list[int]], LabelTable | None]] = \
            OrderedDict()
        self._pinned = 0  # shards the batch being read holds open: the caches never evict below this
        self.ring: BatchRing | None = None  # set by ShardLoader for each iteration
        self._hwc: np.ndarray | None = None  # per-process HWC scratch batch (CHW layout with a ring)

    # -- per-process caches (each DataLoader worker has its own copy) ---------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.counts, self.seed, epoch, self.rank, self.world_size,
                                              self.shuffle, self.window))
        return self._order[1]

    def _index(self, s: int) -> tuple[np.ndarray, list[str], list[list[int]], LabelTable | None]:
        """(count, 5) int64 (json offset, json size, image offset, image size, image ext code), the keys, the same
        rows as Python lists (what the per-sample loop reads without numpy scalar overhead; None when `row_lists` is
        False), and the shard's label table when the manifest lists one (else labels come from each sample's json
        member)."""
        if s in self._indexes:
            self._indexes.move_to_end(s)
            return self._indexes[s]
        rec = self.records[s]
        arr, keys = index_array(self.folder / rec["index"], self.exts)
        if len(keys) != rec["count"]:
            raise ShardError(f"shard {rec['name']}: index lists {len(keys)} samples, manifest {rec['count']}")
        table = None
        if rec.get("labels"):
            cols = read_label_table(self.folder / rec["labels"], rec["count"], rec.get("checksum") == CHECKSUM,
                                    label_columns(tuple(self.vocabs)))
            table = self._table(cols, keys, rec["name"])
        self._indexes[s] = (arr, keys, arr.tolist() if self.row_lists else None, table)
        while len(self._indexes) > max(self.cache_shards, self._pinned):
            self._indexes.popitem(last=False)
        return self._indexes[s]

    def _table(self, cols: dict[str, list[Any]], keys: list[str], shard: str) -> Any:
        return LabelTable(cols, self.vocabs, keys, shard)

    def _file(self, s: int) -> Any:
        if s in self._files:
            self._files.move_to_end(s)
            return self._files[s]
        path = self.folder / self.records[s]["name"]
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115  (cached handle, closed on eviction)
        except FileNotFoundError:
            raise MissingShardError(f"shard {path} listed in the manifest is missing") from None
        self._files[s] = f
        while len(self._files) > max(self.cache_shards, self._pinned):
            self._files.popitem(last=False)[1].close()
        return f

    def __getstate__(self) -> dict[str, Any]:  # open files do not travel to worker processes
        d = dict(self.__dict__)
        d["_files"], d["_indexes"], d["_order"], d["_hwc"] = OrderedDict(), OrderedDict(), None, None
        return d

    # -- reading ----------------------------------------------------------------------------------------------
    def read(self, g: int, s: int | None = None, crc: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Sample with global id g (in shard s when known): (HWC uint8 image, metadata); with `crc`, the image
        member's bytes must have that crc32. Every failure is a ShardError naming shard and key."""
        if s is None:
            s = int(np.searchsorted(self.starts, g, side="right") - 1)
        j = g - int(self.starts[s])
        name = self.records[s]["name"]
        arr, keys, _, _ = self._index(s)
        jo, js, io_, is_, ext = arr[j].tolist()
        key = keys[j]
        if jo < 0:
            raise ShardError(f"shard {name}, key {key}: missing json or image member")
        f = self._file(s)
        # json then image: one read covering both members (and the tar header between them).
        lo, hi = min(jo, io_), max(jo + js, io_ + is_)
        buf = os.pread(f.fileno(), hi - lo, lo)
        if len(buf) != hi - lo:
            raise ShardError(f"shard {name}, key {key}: the tar file ends early (truncated shard)")
        data = memoryview(buf)[io_ - lo: io_ - lo + is_]
        if crc is not None:
            self._check_crc(data, crc, name, key)
        try:
            meta = json.loads(buf[jo - lo: jo - lo + js])
            if not isinstance(meta, dict):
                raise ValueError(f"the json member is a {type(meta).__name__}, not an object")  # noqa: TRY004
            shape = meta.get("shape", self.shape)
            if not isinstance(shape, list) or tuple(shape) != self.shape:
                raise ValueError(f"shape {shape} differs from the manifest's {list(self.shape)}")
            img = decode_image(data, list(EXT_TO_ENCODING)[ext], shape)  # ValueError for any decoder failure
        except ValueError as e:
            raise ShardError(f"shard {name}, key {key}: {e}") from e
        return img, meta

    def _check_crc(self, data: Any, want: int, name: str, key: str) -> None:
        got = payload_crc(data)
        if got != want:
            raise ChecksumError(f"shard {name}, key {key}: the {self.payload} bytes read have crc32 {got:08x}, the label "
                                f"table recorded {want:08x} when the shard was written: the shard is damaged or its "
                                f"index does not fit the tar (`phenoflow data verify {self.folder}` names which)")

    def _labels(self, meta: dict[str, Any], shard: str) -> tuple[list[int], float, bool]:
        """Label indexes, dose and is_control of one sample's metadata; ShardError naming shard and key."""
        try:
            lab = [self.vocabs[grp].index(str(meta[grp])) for grp in LABEL_GROUPS]
            # The writer always records dose and is_control; a missing one is damage, not dose 0.0.
            d, c = float(meta["dose"]), bool(meta["is_control"])
        except KeyError as e:
            raise ShardError(f"shard {shard}, key {meta.get('key')}: metadata lacks {e}") from None
        except (TypeError, ValueError) as e:  # an unknown label (UnknownLabelError) or a dose that is no number
            what = e if isinstance(e, UnknownLabelError) else f"dose {meta['dose']!r} is not a number"
            raise ShardError(f"shard {shard}, key {meta.get('key')}: {what}") from None
        if not math.isfinite(d):
            raise ShardError(f"shard {shard}, key {meta.get('key')}: dose {d} is not finite")
        return lab, d, c

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        """Batch (epoch, b), in a DataLoader worker: into a slot of the ring the worker was started with."""
        return self.fetch(item, self.ring)

    def fetch(self, item: tuple[int, int], ring: BatchRing | None) -> dict[str, Any]:
        """Batch b of `epoch` as numpy labels plus the image in a slot of `ring` (or a fresh buffer); ``to_batch``
        turns it into tensors."""
        epoch, b = item
        ids = self.order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        slot = None
        if ring is not None and len(ids) <= ring.batch_shape[0]:
            slot = ring.acquire(wid)
        if slot is not None and self.channels_last:  # read straight into the ring slot
            rows = ring.slot(wid, slot).reshape(-1, *self.shape)
        elif slot is not None:  # CHW: read into this process's HWC scratch, then one transposing copy into the slot
            if self._hwc is None or len(self._hwc) < len(ids):
                self._hwc = np.empty((self.batch_size, *self.shape), np.uint8)
            rows = self._hwc
        else:
            images = _batch_buffer((len(ids), *self.shape))
            rows = images.numpy()  # the same memory, as numpy rows preadv can fill
        nbytes = rows[0].nbytes if len(ids) else 0
        labels = np.empty((len(ids), len(LABEL_GROUPS)), np.int64)
        dose, ctrl = np.empty(len(ids), np.float32), np.empty(len(ids), bool)
        keys, skipped = np.empty(len(ids), object), []
        from_table: list[int] = []  # batch positions whose labels come from a label table (filled after the loop)
        kept = np.empty(len(ids), np.int64)  # batch position of each kept sample
        scratch = bytearray(1024)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        local = ids - self.starts[shard_of]
        uniq = np.unique(shard_of).tolist()
        self._pinned = len(uniq)  # a batch spanning more shards than the caches hold keeps them all open
        check = self._to_check(ids)  # per batch position: check the image bytes against the table's crc32
        try:
            src = {s: (self._file(s).fileno(), *self._index(s)[2:], self.records[s]["name"]) for s in uniq}
            n = 0
            for pos, (g, s, j) in enumerate(zip(ids.tolist(), shard_of.tolist(), local.tolist())):
                fd, entries, table, name = src[s]
                try:
                    if table is not None:  # labels from the shard's table: read only the image
                        if not table.ok[j]:
                            self._labels(table.meta(j), name)  # raises the json path's message
                            raise ShardError(f"shard {name}, key {table.keys[j]}: unusable label table entry")
                        want = table.crc[j] if check[pos] and table.crc is not None else None
                        jo, _, io_, is_, ext = entries[j]
                        if ext != _RAW_EXT or is_ != nbytes or jo < 0 or os.preadv(fd, [rows[n]], io_) != nbytes:
                            rows[n] = self.read(g, s, want)[0]  # other encodings; raises for damage
                        elif want is not None:
                            self._check_crc(rows[n], want, name, table.keys[j])
                        from_table.append(pos)
                    else:
                        meta = _read_raw_into(fd, entries[j], rows[n], scratch, self._shape_list)
                        if meta is None:  # general path: other encodings, and every error case
                            img, meta = self.read(g, s)
                            rows[n] = img
                        lab, d, c = self._labels(meta, name)
                        labels[n], dose[n], ctrl[n], keys[n] = lab, d, c, str(meta.get("key", self._index(s)[1][j]))
                except (OSError, ShardError) as e:  # raise, or count and skip (data/errors.py: bad_sample)
                    bad_sample(e, self.policy, skipped, name, self._index(s)[1][j])
                    continue
                kept[n] = pos
                n += 1
        finally:
            self._pinned = 0
        if self._verified is not None and n:  # first_pass: these passed (or have no checksum to check)
            self._verified.numpy()[ids[kept[:n]]] = 1
        if from_table:  # gather the table-backed labels shard by shard, vectorised
            kept_pos = kept[:n]
            is_tab = np.isin(kept_pos, from_table)
            for s in uniq:
                table = src[s][2]
                if table is None:
                    continue
                m = is_tab & (shard_of[kept_pos] == s)
                jj = local[kept_pos[m]]
                labels[:n][m], dose[:n][m], ctrl[:n][m], keys[:n][m] = (table.lab[jj], table.dose[jj],
                                                                        table.ctrl[jj], table.keys[jj])
        # Labels travel as numpy arrays (pickled by value: cheaper between processes than a tensor's shared
        # segment); ShardLoader makes them tensors.
        out: dict[str, Any] = {**{g: np.ascontiguousarray(labels[:n, i]) for i, g in enumerate(LABEL_GROUPS)},
                               "dose": dose[:n], "is_control": ctrl[:n], "key": keys[:n].tolist()}
        if slot is not None:
            if not self.channels_last:
                h, w, c = self.shape
                ring.slot(wid, slot).reshape(-1, c, h, w)[:n] = rows[:n].transpose(0, 3, 1, 2)
            out["_slot"] = (wid, slot, n)  # the consumer wraps the ring slot (to_batch)
        elif self.channels_last:  # (B, C, H, W) view of the HWC buffer: torch's channels_last layout, no copy
            out["image"] = images[:n].permute(0, 3, 1, 2)
        else:  # HWC -> CHW in numpy (one thread: torch's intra-op pool stalls on oversubscribed cores)
            out["image"] = torch.from_numpy(np.ascontiguousarray(rows[:n].transpose(0, 3, 1, 2)))
        if skipped:
            out["_skipped"] = skipped
        return out

    def _to_check(self, ids: np.ndarray) -> list[bool]:
        if self.checksums == "first_pass":
            return (self._verified.numpy()[ids] == 0).tolist()
        return [self.checksums == "always"] * len(ids)

    def to_batch(self, out: dict[str, Any], ring: BatchRing | None) -> dict[str, Any]:
        """A dict from ``__getitem__`` (possibly from a worker filling `ring`) as the loader's batch of tensors."""
        if "_slot" in out:
            w, k, n = out.pop("_slot")
            h, wd, c = self.shape
            flat = ring.tensor(w, k, n)
            out["image"] = flat.view(n, h, wd, c).permute(0, 3, 1, 2) if self.channels_last else flat.view(n, c, h, wd)
        for g in (*LABEL_GROUPS, "dose", "is_control"):
            out[g] = torch.from_numpy(out[g])
        return out

    def ring_shape(self, batch_size: int) -> tuple[int, ...] | None:
        """The byte shape of one ring slot: a batch of uint8 images (None: no ring)."""
        return (batch_size, *self.shape) if self.shape else None

    def _shard_name(self, g: int) -> str:
        return self.records[int(np.searchsorted(self.starts, g, side="right") - 1)]["name"]

    def __len__(self) -> int:  # not used by the sampler-driven DataLoader; kept for introspection
        return batches_per_epoch(int(self.starts[-1]), self.batch_size, self.rank, self.world_size, True)
