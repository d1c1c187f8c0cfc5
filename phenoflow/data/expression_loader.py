"""Batches of expression shard folders (expression_shards.py) for `ShardLoader`, which dispatches here on the
manifest's ``modality: "expression"``: the same epoch order (order.py), state, resume, rank parts, DataLoader
workers, shard caches, checksum policies (crc32 of each .csr member) and bad-sample policy as images; only the
payload differs.

Batch: {"x": float32 (B, G) dense log1p expression over the manifest's genes (the sparse rows scattered),
"perturbation": int64 (B, K) component ids padded with -1 (K = the manifest's max_combination; a control cell
is [control id, -1, ...]), one int64 (B,) entry per covariate (e.g. "cell_type") and "dataset", "dose": float32
(B,) (the first component's dose; 0.0 without one), "is_control": bool (B,), "key": list[str]}.
Dense rows are made per batch in the reading process (no ring: a batch of 256 x 2,000 genes is 2 MB, sent from
a worker as one pickled array).
"""
from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .anndata_io import ExpressionColumns
from .errors import MissingShardError, ShardError, bad_sample
from .expression_shards import decode_csr
from .shard_batches import ShardBatches
from .tables import _as_float, payload_crc
from .vocab import Vocab


def member_slices(words: np.ndarray, floats: np.ndarray, starts: np.ndarray,
                  sizes: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray] | None:
    """(positions, values, nnz) of the .csr members at word offsets `starts` with byte sizes `sizes` of one buffer
    seen as int32 `words` and float32 `floats` (member layout, expression_shards.py: int32 nnz, int32
    positions[nnz], float32 values[nnz], so 4 + 8 nnz bytes); None when a header does not fit its size."""
    if np.any(sizes < 4) or np.any((sizes - 4) % 8):
        return None
    nnz = (sizes - 4) // 8
    if np.any(starts + 1 + 2 * nnz > len(words)) or not np.array_equal(words[starts], nnz):
        return None
    first, count = (starts + 1).tolist(), nnz.tolist()
    return ([words[s:s + n] for s, n in zip(first, count)], [floats[s + n:s + 2 * n] for s, n in zip(first, count)],
            nnz)


def scatter_rows(x: np.ndarray, rows: np.ndarray, nnz: np.ndarray, idx: np.ndarray, val: np.ndarray) -> bool:
    """x[rows[i], positions of member i] = its values, for the concatenated positions idx and values val of the
    members (nnz entries each); False, with x untouched, when a position is outside [0, x.shape[1]), a member's
    positions are not strictly increasing, or a value is not finite."""
    total, n_genes = len(idx), x.shape[1]
    if total == 0:
        return True
    if idx.min() < 0 or idx.max() >= n_genes or not np.isfinite(val).all():
        return False
    inc = idx[1:] > idx[:-1]
    first = np.cumsum(nnz)[:-1]  # where each member after the first starts in idx
    first = first[(first > 0) & (first < total)]
    inc[first - 1] = True  # a member may start below where the previous one ended
    if not inc.all():
        return False
    flat = np.repeat(rows.astype(np.int64) * n_genes, nnz) + idx
    if x.flags.c_contiguous:
        x.reshape(-1)[flat] = val  # one scatter through the flat index
    else:
        x[flat // n_genes, idx] = val
    return True


def decode_batch(bufs: list[Any], n_genes: int, x: np.ndarray) -> bool:
    """Decode the .csr members `bufs` (row i of x for member i) all at once; False, with x untouched, when any
    member is malformed (header vs size, positions outside [0, n_genes) or not strictly increasing, non-finite
    values): the caller then decodes sample by sample with decode_csr, whose errors name the sample."""
    m = len(bufs)
    if m == 0:
        return True
    sizes = np.fromiter(map(len, bufs), np.int64, m)
    starts = np.zeros(m, np.int64)
    np.cumsum(sizes[:-1] // 4, out=starts[1:])  # member starts, in 4-byte words (sizes checked below)
    raw = b"".join(bufs)
    if len(raw) % 4:
        return False
    got = member_slices(np.frombuffer(raw, "<i4"), np.frombuffer(raw, "<f4"), starts, sizes)
    if got is None:
        return False
    pos, vals, nnz = got
    return scatter_rows(x[:, :n_genes], np.arange(m), nnz, np.concatenate(pos), np.concatenate(vals))


class ExpressionTable:
    """A shard's label table mapped through the vocabularies once: component ids (n, K), covariate and dataset
    ids (n, groups - 1), doses, control flags, keys, crc32s; `ok[j]` False (with `problem(j)`) for an entry
    that cannot be used (a component or label outside the vocabularies, too many components, a bad dose)."""

    def __init__(self, cols: dict[str, list[Any]], vocabs: dict[str, Vocab], keys: list[str], shard: str,
                 columns: ExpressionColumns, max_combination: int):
        if cols["key"] != keys:
            j = next(i for i, (a, b) in enumerate(zip(cols["key"], keys)) if a != b)
            raise MissingShardError(f"shard {shard}: its label table lists key {cols['key'][j]!r} at position {j}, "
                                    f"its index {keys[j]!r}")
        self.cols, self.groups = cols, tuple(vocabs)
        n, pv = len(keys), vocabs["perturbation"]
        self.pert = np.full((n, max_combination), -1, np.int64)
        self._why: dict[int, str] = {}
        parsed: dict[Any, tuple[list[int], str | None]] = {}
        for j, lab in enumerate(cols["perturbation"]):
            if lab not in parsed:
                comps = columns.components(lab) if isinstance(lab, str) else None
                if comps is None:
                    parsed[lab] = ([], f"perturbation {lab!r} is not a label")
                elif len(comps) > max_combination:
                    parsed[lab] = ([], f"perturbation {lab!r} has more than {max_combination} components")
                else:
                    ids = pv.indices(comps or [columns.control])
                    bad = [c for c, i in zip(comps, ids) if i < 0]
                    parsed[lab] = (ids, f"unknown perturbation component {bad[0]!r} of {lab!r}" if bad else None)
            ids, why = parsed[lab]
            if why:
                self._why[j] = why
            else:
                self.pert[j, :len(ids)] = ids
        self.lab = np.empty((n, len(self.groups) - 1), np.int64)
        for i, g in enumerate(self.groups[1:]):
            self.lab[:, i] = vocabs[g].indices(cols[g])
            for j in np.flatnonzero(self.lab[:, i] < 0).tolist():
                self._why.setdefault(j, f"unknown {g} label {cols[g][j]!r} (not in the manifest's vocabulary)")
        self.dose = np.asarray([_as_float(d) for d in cols["dose"]], np.float64)
        for j in np.flatnonzero(~np.isfinite(self.dose)).tolist():
            self._why.setdefault(j, f"dose {cols['dose'][j]!r} is not a finite number")
        for j, c in enumerate(cols["is_control"]):
            if c is None:
                self._why.setdefault(j, "metadata lacks 'is_control'")
        self.ctrl = np.asarray([bool(c) for c in cols["is_control"]], bool)
        self.keys = np.asarray(keys, dtype=object)
        self.ok = [j not in self._why for j in range(n)]
        self.ok_all = np.asarray(self.ok, bool)  # the same, as an array (the batch path's check)
        self.crc: list[int] | None = cols.get("crc32")

    def problem(self, j: int) -> str:
        return self._why.get(j, "unusable label table entry")


class ExpressionBatches(ShardBatches):
    """ShardBatches over .csr members: batch (epoch, b) as dense expression rows plus labels (module doc)."""

    payload, exts = "expression", ("csr",)
    row_lists = False  # the batch path reads the index as an array; the per-sample fallback lists it on demand

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        m = self.manifest
        self.genes, self.n_genes = list(m["genes"]), len(m["genes"])
        self.max_combination = int(m.get("max_combination", 2))
        self.columns = ExpressionColumns(**m["columns"])
        self.groups = tuple(self.vocabs)  # perturbation, covariates..., dataset

    def _table(self, cols: dict[str, list[Any]], keys: list[str], shard: str) -> ExpressionTable:
        return ExpressionTable(cols, self.vocabs, keys, shard, self.columns, self.max_combination)

    def fetch(self, item: tuple[int, int], ring: Any = None) -> dict[str, Any]:
        """One batch. Fast path (`_fetch_mapped`): each shard's members of the batch sliced out of the shard's
        memory map, their table entries checked as arrays, crc32s checked, then decoded for the whole batch at once
        (member_slices + scatter_rows; decode_batch does the same for a list of member bytes). Any problem sends
        the batch through the per-sample path (`_fetch_each`), which names the sample and applies the bad-sample
        policy."""
        epoch, b = item
        ids = self.order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        local = ids - self.starts[shard_of]
        uniq = np.unique(shard_of).tolist()
        # The dense rows go into a ring slot when one is free (a DataLoader worker: shared memory, only the slot
        # number crosses to the main process instead of a pickled 2 MB array; in process: no fresh pages to fault
        # in per batch), else into a fresh array.
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        slot = ring.acquire(wid) if ring is not None and len(ids) <= ring.batch_shape[0] else None
        if slot is None:
            x = np.zeros((len(ids), self.n_genes), np.float32)
        else:
            x = ring.slot(wid, slot).view(np.float32).reshape(ring.batch_shape[0], self.n_genes)[:len(ids)]
            x.fill(0.0)
        self._pinned = len(uniq)  # a batch spanning more shards than the caches hold keeps them all open
        try:
            out = self._fetch_mapped(ids, shard_of, local, uniq, x)
            if out is None:
                out = self._fetch_each(ids, shard_of, local, uniq, x)
        except BaseException:
            if slot is not None:
                ring._release(wid, slot)
            raise
        finally:
            self._pinned = 0
        if slot is not None:
            out["_slot"] = (wid, slot, len(out.pop("x")))
        return out

    def ring_shape(self, batch_size: int) -> tuple[int, ...] | None:
        """A ring slot holds a batch of dense float32 rows, as bytes: (batch, genes x 4)."""
        return (batch_size, self.n_genes * 4)

    def _map(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The shard file as read-only uint8, int32 and float32 arrays over one memory map (cached like the file
        handles; the word views cover the file's whole 4-byte words); None when it
        cannot be mapped (an empty file), and the per-sample path reports it. Shards are immutable once written;
        a file truncated while mapped would fault (SIGBUS) rather than raise, which is why every read checks the
        member against the mapped length first and a truncated shard goes to the per-sample path."""
        maps = self.__dict__.setdefault("_maps", OrderedDict())
        if s in maps:
            maps.move_to_end(s)
            return maps[s]
        try:
            # MAP_POPULATE (Linux): map every page of the (page-cached) file in one call instead of one fault per
            # 4 KB page on first touch; an epoch reads nearly every member of each shard it opens.
            mm = mmap.mmap(self._file(s).fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ)
        except (ValueError, OSError):
            return None
        data = np.frombuffer(mm, np.uint8)
        whole = data[:len(data) // 4 * 4]
        maps[s] = (data, whole.view("<i4"), whole.view("<f4"))
        while len(maps) > max(self.cache_shards, self._pinned):
            maps.popitem(last=False)  # the map closes when the last view of it goes
        return maps[s]

    def __getstate__(self) -> dict[str, Any]:  # maps, like open files, do not travel to worker processes
        d = super().__getstate__()
        d.pop("_maps", None)
        return d

    def _fetch_mapped(self, ids: np.ndarray, shard_of: np.ndarray, local: np.ndarray, uniq: list[int],
                      x: np.ndarray) -> dict[str, Any] | None:
        """The batch with per-shard array checks and one decode; None when any sample needs the per-sample path
        (a table entry that cannot be used, a missing, misaligned or out-of-file member, a crc mismatch, a
        malformed member). Members are read in place from the shard's map (int32 / float32 views of it: tar
        members start at multiples of 512 bytes). Nothing is marked verified unless the whole batch passes."""
        n = len(ids)
        check = np.asarray(self._to_check(ids), bool)
        rows, pos_parts, val_parts, nnz_parts, tables = [], [], [], [], {}
        for s in uniq:
            arr, _, _, table = self._index(s)
            mapped = self._map(s) if table is not None else None
            if mapped is None:
                return None
            data, words, floats = mapped
            at = np.flatnonzero(shard_of == s)
            jj = local[at]
            po, size = arr[jj, 2], arr[jj, 3]
            if not table.ok_all[jj].all() or (po < 0).any() or (po % 4).any() or (po + size > len(data)).any():
                return None
            need = check[at]  # first_pass: only members not yet verified; none after the first epoch
            if table.crc is not None and need.any():
                view, crc = memoryview(data), table.crc
                for j, o, z in zip(jj[need].tolist(), po[need].tolist(), size[need].tolist()):
                    if payload_crc(view[o:o + z]) != crc[j]:
                        return None  # the per-sample path raises the ChecksumError naming shard and key
            got = member_slices(words, floats, po // 4, size)
            if got is None:
                return None
            rows.append(at)
            pos_parts += got[0]
            val_parts += got[1]
            nnz_parts.append(got[2])
            tables[s] = table
        if pos_parts and not scatter_rows(x, np.concatenate(rows), np.concatenate(nnz_parts),
                                          np.concatenate(pos_parts), np.concatenate(val_parts)):
            return None
        if self._verified is not None and n:
            self._verified.numpy()[ids] = 1
        return self._labels_out(x, shard_of, local, np.arange(n), uniq, tables, [])

    def _fetch_each(self, ids: np.ndarray, shard_of: np.ndarray, local: np.ndarray, uniq: list[int],
                    x: np.ndarray) -> dict[str, Any]:
        """The batch sample by sample into the zeroed rows x: every failure is a ShardError naming shard and key,
        raised or counted and skipped by the bad-sample policy (data/errors.py); kept samples fill x's first rows."""
        kept, skipped = np.empty(len(ids), np.int64), []
        check = self._to_check(ids)
        n = 0
        src = {}
        for s in uniq:
            arr, keys, _, table = self._index(s)
            src[s] = (self._file(s).fileno(), keys, arr.tolist(), table, self.records[s]["name"])
        for pos, (s, j) in enumerate(zip(shard_of.tolist(), local.tolist())):
            fd, keys, entries, table, name = src[s]
            try:
                if table is None:
                    raise MissingShardError(f"shard {name}: no label table in the manifest (rebuild the tables "
                                            f"with `phenoflow data labels {self.folder}`)")
                if not table.ok[j]:
                    raise ShardError(f"shard {name}, key {keys[j]}: {table.problem(j)}")
                _, _, po, size, _ = entries[j]
                if po < 0:
                    raise ShardError(f"shard {name}, key {keys[j]}: missing json or csr member")
                buf = os.pread(fd, size, po)
                if len(buf) != size:
                    raise ShardError(f"shard {name}, key {keys[j]}: the tar file ends early (truncated shard)")
                if check[pos] and table.crc is not None:
                    self._check_crc(buf, table.crc[j], name, keys[j])
                try:
                    idx, val = decode_csr(buf, self.n_genes)
                except ValueError as e:
                    raise ShardError(f"shard {name}, key {keys[j]}: {e}") from None
                x[n, idx] = val
            except (OSError, ShardError) as e:  # raise, or count and skip (data/errors.py: bad_sample)
                bad_sample(e, self.policy, skipped, name, keys[j])
                continue
            kept[n] = pos
            n += 1
        kp = kept[:n]
        if self._verified is not None and n:
            self._verified.numpy()[ids[kp]] = 1
        return self._labels_out(x[:n], shard_of, local, kp, uniq, {s: src[s][3] for s in uniq}, skipped)

    def _labels_out(self, x: np.ndarray, shard_of: np.ndarray, local: np.ndarray, kp: np.ndarray, uniq: list[int],
                    tables: dict[int, ExpressionTable], skipped: list) -> dict[str, Any]:
        """The batch dict: x plus the labels of the kept positions kp, gathered shard by shard (vectorised)."""
        n = len(kp)
        pert = np.empty((n, self.max_combination), np.int64)
        lab = np.empty((n, len(self.groups) - 1), np.int64)
        dose, ctrl, keys_out = np.empty(n, np.float32), np.empty(n, bool), np.empty(n, object)
        for s in uniq:
            m = shard_of[kp] == s
            jj = local[kp[m]]
            t = tables[s]
            pert[m], lab[m], dose[m], ctrl[m], keys_out[m] = t.pert[jj], t.lab[jj], t.dose[jj], t.ctrl[jj], t.keys[jj]
        out: dict[str, Any] = {"x": x, "perturbation": pert,
                               **{g: np.ascontiguousarray(lab[:, i]) for i, g in enumerate(self.groups[1:])},
                               "dose": dose, "is_control": ctrl, "key": keys_out.tolist()}
        if skipped:
            out["_skipped"] = skipped
        return out

    def to_batch(self, out: dict[str, Any], ring: Any = None) -> dict[str, Any]:
        if "_slot" in out:  # the rows are in a ring slot: a tensor over it (the slot is freed with the tensor)
            w, k, n = out.pop("_slot")
            out["x"] = ring.tensor(w, k, n).view(torch.float32).view(n, self.n_genes)
        for k, v in out.items():
            if isinstance(v, np.ndarray):
                out[k] = torch.from_numpy(v)
        return out
