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

import os
from typing import Any

import numpy as np
import torch

from .anndata_io import ExpressionColumns
from .errors import MissingShardError, ShardError, bad_sample
from .expression_shards import decode_csr
from .loader import ShardBatches
from .tables import _as_float
from .vocab import Vocab


class _SlowPath(Exception):
    """The batch decode found a member it cannot accept: redo the batch sample by sample."""


def decode_batch(bufs: list[bytes], n_genes: int, x: np.ndarray) -> bool:
    """Decode the .csr members `bufs` (row i of x for member i) all at once; False, with x untouched, when any
    member is malformed (header vs size, positions outside [0, n_genes) or not strictly increasing, non-finite
    values): the caller then decodes sample by sample with decode_csr, whose errors name the sample.

    Member layout (expression_shards.py): int32 nnz, int32 positions[nnz], float32 values[nnz]; every member is
    4 + 8 nnz bytes, so all offsets into the concatenation are multiples of 4 and one int32 / float32 view of it
    reads every field."""
    sizes = np.fromiter((len(b) for b in bufs), np.int64, len(bufs))
    if np.any(sizes < 4) or np.any((sizes - 4) % 8):
        return False
    nnz = (sizes - 4) // 8
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) // 4  # member starts, in int32 words
    raw = b"".join(bufs)
    words = np.frombuffer(raw, "<i4")
    if not np.array_equal(words[starts], nnz):
        return False
    total = int(nnz.sum())
    if total == 0:
        return True
    rows = np.repeat(np.arange(len(bufs)), nnz)
    within = np.arange(total) - np.repeat(np.cumsum(nnz) - nnz, nnz)  # position inside its member
    pos_at = np.repeat(starts + 1, nnz) + within  # word index of each position
    idx = words[pos_at]
    val = np.frombuffer(raw, "<f4")[pos_at + np.repeat(nnz, nnz)]
    if idx.min() < 0 or idx.max() >= n_genes or not np.isfinite(val).all():
        return False
    same_row = rows[1:] == rows[:-1]
    if np.any(same_row & (idx[1:] <= idx[:-1])):
        return False
    x[rows, idx] = val
    return True


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
        self.crc: list[int] | None = cols.get("crc32")

    def problem(self, j: int) -> str:
        return self._why.get(j, "unusable label table entry")


class ExpressionBatches(ShardBatches):
    """ShardBatches over .csr members: batch (epoch, b) as dense expression rows plus labels (module doc)."""

    payload, exts = "expression", ("csr",)

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
        """One batch. Fast path: every member read, checked against its table entry and crc32 as it is read,
        then decoded for the whole batch at once (decode_batch); any sample the batch decode finds bad sends the
        batch through the per-sample path (`fast=False`), which names it and applies the bad-sample policy."""
        try:
            return self._fetch(item, fast=True)
        except _SlowPath:
            return self._fetch(item, fast=False)

    def _fetch(self, item: tuple[int, int], fast: bool) -> dict[str, Any]:
        epoch, b = item
        ids = self.order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
        x = np.zeros((len(ids), self.n_genes), np.float32)
        bufs: list[bytes] = []  # fast path: the members' bytes, decoded together after the loop
        kept, skipped = np.empty(len(ids), np.int64), []
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        local = ids - self.starts[shard_of]
        uniq = np.unique(shard_of).tolist()
        self._pinned = len(uniq)
        check = self._to_check(ids)
        n = 0
        try:
            src = {s: (self._file(s).fileno(), *self._index(s)[1:], self.records[s]["name"]) for s in uniq}
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
                    if fast:
                        bufs.append(buf)
                    else:
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
        finally:
            self._pinned = 0
        if fast and bufs and not decode_batch(bufs, self.n_genes, x):
            raise _SlowPath  # a bad member: the per-sample path names it (nothing was marked verified yet)
        kp = kept[:n]
        if self._verified is not None and n:
            self._verified.numpy()[ids[kp]] = 1
        pert = np.empty((n, self.max_combination), np.int64)
        lab = np.empty((n, len(self.groups) - 1), np.int64)
        dose, ctrl, keys_out = np.empty(n, np.float32), np.empty(n, bool), np.empty(n, object)
        for s in uniq:  # labels gathered shard by shard, vectorised
            m = shard_of[kp] == s
            jj = local[kp[m]]
            t = src[s][3]
            pert[m], lab[m], dose[m], ctrl[m], keys_out[m] = t.pert[jj], t.lab[jj], t.dose[jj], t.ctrl[jj], t.keys[jj]
        out: dict[str, Any] = {"x": x[:n], "perturbation": pert,
                               **{g: np.ascontiguousarray(lab[:, i]) for i, g in enumerate(self.groups[1:])},
                               "dose": dose, "is_control": ctrl, "key": keys_out.tolist()}
        if skipped:
            out["_skipped"] = skipped
        return out

    def to_batch(self, out: dict[str, Any], ring: Any = None) -> dict[str, Any]:
        for k, v in out.items():
            if isinstance(v, np.ndarray):
                out[k] = torch.from_numpy(v)
        return out
