"""Expression shards: AnnData (.h5ad) -> shard format v1 with one cell per sample (`convert_anndata`).

The folder is a shard folder like the image one (docs/data.md, sections 2 and 7): WebDataset tars, DALI wds2idx
indexes, per-shard label tables with crc32s, and a manifest, written by the same `ShardWriter` code, so
`ShardLoader`, `verify_shards` and `phenoflow data labels` serve it unchanged. Per cell, two members:

    <key>.json  {"key", "cell_id" (obs name), "row" (row in the source file), "split", "encoding": "csr",
                 "n_genes", "nnz", "perturbation" (the obs label, e.g. "KLF1+MAP2K6"), "components" (its single
                 perturbations; [] for a control), one field per covariate, "dataset", "dose", "doses" (one per
                 component), "is_control"}
    <key>.csr   the cell's log1p row restricted to the manifest's gene list, sparse, little-endian:
                int32 nnz | int32 gene positions [nnz] (strictly increasing, in [0, n_genes)) | float32 values [nnz]
                (4 + 8 nnz bytes; explicit zeros dropped; positions index the manifest's `genes`)

Keys are `c<row:09d>` (the row in the source file; obs names may hold '.', '/' or be long). Label table columns:
key, perturbation (the label string), each covariate, dataset (label groups: mapped through the manifest's
vocabularies when a shard is opened), dose, is_control, crc32 (of the .csr member). Manifest fields beyond the
image format's: modality "expression", encoding "csr", dtype "float32", values "log1p", genes, n_genes,
max_combination, label_groups, covariates, columns (the ExpressionColumns used), source (file, size, cells,
x_state decision, split CSV, validation report counts, shuffle parameters).

Memory: a path is opened with h5py (no AnnData object: anndata's backed mode still loads every layer); only
obs names, the obs columns used and var names are read whole (O(cells) labels, not the matrix); `.X` (CSR or
dense) is read in row ranges of at most `chunk_rows` rows, three passes (validation, x-state detection,
writing), so peak memory is bounded by one shard's rows plus one read range, whatever the file size.

Order: a split's cells are cut into blocks of `block_rows` consecutive cells, the blocks permuted by
(seed, split), shards cut from that sequence, and each shard's cells permuted by (seed, split, shard): every
shard mixes cells from all over the file (h5ad files are often sorted by condition; the loader's shard and
window shuffles rely on mixed shards) while a shard is still read in about samples_per_shard / block_rows ranges.
"""
from __future__ import annotations

import json
import logging
import re
import struct
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .anndata_io import DEFAULT_CHUNK_ROWS, ExpressionColumns, validate_expression
from .errors import DataError
from .shards import FORMAT, VERSION, ShardWriter, _check_key, write_manifest
from .vocab import Vocab

log = logging.getLogger("phenoflow.data")
SPLIT_ORDER = ("train", "val", "test")
_SPAN = 256  # at most this many file rows per read


# -- payload ------------------------------------------------------------------------------------------------
def encode_csr(idx: np.ndarray, val: np.ndarray) -> bytes:
    """One cell's sparse row -> the .csr member bytes (module docstring)."""
    return struct.pack("<i", len(idx)) + np.asarray(idx, "<i4").tobytes() + np.asarray(val, "<f4").tobytes()


def decode_csr(data: Any, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """.csr member bytes -> (int32 positions, float32 values); ValueError naming what does not fit."""
    if len(data) < 4:
        raise ValueError(f"the csr member has {len(data)} bytes, fewer than its 4-byte header")
    nnz = int(np.frombuffer(data, "<i4", 1)[0])
    if nnz < 0 or len(data) != 4 + 8 * nnz:
        raise ValueError(f"the csr member has {len(data)} bytes, its header says nnz={nnz} (needs {4 + 8 * nnz})")
    idx = np.frombuffer(data, "<i4", nnz, 4)
    val = np.frombuffer(data, "<f4", nnz, 4 + 4 * nnz)
    if nnz and (idx[0] < 0 or idx[-1] >= n_genes or (nnz > 1 and np.any(np.diff(idx) <= 0))):
        raise ValueError(f"gene positions are not strictly increasing within [0, {n_genes})")
    if not np.all(np.isfinite(val)):
        raise ValueError("the expression values hold NaN/inf")
    return idx, val


class ExpressionShardWriter(ShardWriter):
    """ShardWriter for cells: `write(idx, val, meta)`; label groups = perturbation, covariates, dataset."""

    payload = "expression"
    encodings: ClassVar[dict[str, str]] = {"csr": "csr"}

    def __init__(self, out_dir: str | Path, split: str, samples_per_shard: int, groups: tuple[str, ...],
                 start_shard: int = 0):
        self.groups = tuple(groups)  # read by ShardWriter.__init__ (table columns, label counts)
        super().__init__(out_dir, split, samples_per_shard, "csr", start_shard=start_shard)

    def write(self, idx: np.ndarray, val: np.ndarray, meta: dict[str, Any]) -> None:  # type: ignore[override]
        key = _check_key(str(meta["key"]))
        m = {**meta, "key": key, "split": self.split, "encoding": "csr", "nnz": len(idx)}
        for g in self.groups:
            self.label_counts[g][str(m[g])] += 1
        self.write_member(key, m, encode_csr(idx, val))


# -- source ---------------------------------------------------------------------------------------------------
class _H5Source:
    """What the converter reads of an .h5ad file, through h5py: obs names, the obs columns used, var names, and
    `.X` as a row-sliceable on-disk matrix (anndata's sparse_dataset, or the h5py dataset when dense)."""

    isbacked = True

    def __init__(self, path: Path, cols: ExpressionColumns):
        import anndata as ad
        import h5py
        import pandas as pd

        try:
            self.file = h5py.File(path, "r")
            obs, var, x = self.file["obs"], self.file["var"], self.file["X"]
            self.obs_names = pd.Index(np.asarray(ad.io.read_elem(obs[obs.attrs["_index"]])).astype(str))
            self.var_names = pd.Index(np.asarray(ad.io.read_elem(var[var.attrs["_index"]])).astype(str))
            want = [cols.perturbation, *cols.covariates, cols.dose, cols.dataset]
            self.obs = pd.DataFrame({c: ad.io.read_elem(obs[c]) for c in dict.fromkeys(want) if c and c in obs},
                                    index=self.obs_names)
            self.X = ad.io.sparse_dataset(x) if isinstance(x, h5py.Group) else x
            self.uns = {k: None for k in self.file.get("uns", {})}  # keys only (detect_x_state's evidence)
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}: cannot read as h5ad: {type(e).__name__}: {e}") from e
        self.n_obs, self.n_vars = len(self.obs_names), len(self.var_names)
        self.layers: dict[str, Any] = {}  # not read: the converter uses .X
        self.filename = str(path)


def _open(source: Any, cols: ExpressionColumns) -> tuple[Any, str]:
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise DataError(f"{p}: no such AnnData file")
        return _H5Source(p, cols), str(p)
    return source, str(getattr(source, "filename", None) or "<AnnData>")


def _read_rows(x: Any, rows: np.ndarray) -> Any:
    """CSR of the sorted file rows `rows`: contiguous ranges (gaps <= 64 rows, spans <= _SPAN rows) read one by
    one, so memory stays within one range plus the result."""
    import scipy.sparse as sp

    parts, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] - rows[i - 1] > 64 or rows[i] - rows[start] >= _SPAN:
            lo, hi = int(rows[start]), int(rows[i - 1]) + 1
            blk = x[lo:hi]
            blk = sp.csr_matrix(blk) if sp.issparse(blk) else sp.csr_matrix(np.asarray(blk))
            parts.append(blk[rows[start:i] - lo])
            start = i
    return sp.vstack(parts, format="csr")


def _log1p_rows(blk: Any, state: str) -> Any:
    """The x-state action (expression_prep.detect_x_state) on a CSR block of whole rows, in float64."""
    if state not in ("counts", "normalized"):
        return blk  # log1p data kept as stored (the writer casts to float32)
    blk = blk.astype(np.float64)
    if state == "counts":  # normalize_total(1e4) over all genes of the file, as scanpy
        sums = np.asarray(blk.sum(axis=1)).ravel()
        scale = np.divide(1e4, sums, out=np.zeros_like(sums), where=sums > 0)
        blk = blk.multiply(scale[:, None]).tocsr()
    blk.data = np.log1p(blk.data)
    return blk


# -- labels -------------------------------------------------------------------------------------------------
def _labels(src: Any, cols: ExpressionColumns, file: str, max_combination: int) -> dict[str, Any]:
    """Per cell: perturbation label, components, doses, is_control, covariates, dataset (vectorised over the
    distinct values); more components than max_combination is a DataError naming file, column and values."""
    from .anndata_io import parse_dose

    pert = src.obs[cols.perturbation].astype(str).to_numpy()
    uniq, inv = np.unique(pert, return_inverse=True)
    comps = [cols.components(u) for u in uniq]
    over = [u for u, c in zip(uniq, comps) if len(c) > max_combination]
    if over:
        raise DataError(f"{file}: column {cols.perturbation!r}: {len(over)} label(s) with more than "
                        f"max_combination={max_combination} components, e.g. {over[:5]}")
    out: dict[str, Any] = {"perturbation": pert, "uniq": uniq, "inv": inv, "components": comps}
    for c in cols.covariates:
        out[c] = src.obs[c].astype(str).to_numpy()
    if cols.dataset is not None and cols.dataset not in cols.covariates:
        out["dataset"] = (src.obs[cols.dataset].astype(str).to_numpy() if cols.dataset in src.obs.columns
                          else np.full(len(pert), Path(file).stem, dtype=object))
    if cols.dose is not None and cols.dose in src.obs.columns:
        dose_u, dose_inv = np.unique(src.obs[cols.dose].astype(str).to_numpy(), return_inverse=True)
        pairs, pinv = np.unique(inv.ravel() * len(dose_u) + dose_inv.ravel(), return_inverse=True)
        doses = [parse_dose(dose_u[c % len(dose_u)], len(comps[c // len(dose_u)]), cols.separator) or ()
                 for c in pairs.tolist()]  # validated (validate_expression) before
        out["doses"] = (doses, np.asarray(pinv).ravel())
    else:
        out["doses"] = ([()], np.zeros(len(pert), np.int64))
    return out


def _groups(cols: ExpressionColumns) -> tuple[str, ...]:
    groups = ("perturbation", *cols.covariates)
    if cols.dataset is not None and cols.dataset not in cols.covariates:
        groups += ("dataset",)
    clash = [g for g in cols.covariates if g in ("key", "dose", "is_control", "perturbation", "x")]
    if clash or len(set(groups)) != len(groups):
        raise DataError(f"ExpressionColumns.covariates {list(cols.covariates)}: names clash with a label-table or "
                        f"batch field ({clash or 'dataset twice'})")
    return groups


def _splits(splits: Any, obs_names: Any, file: str) -> np.ndarray:
    import pandas as pd

    from .expression_splits import read_split_csv

    if splits is None:
        return np.full(len(obs_names), "train", dtype=object)
    if isinstance(splits, (str, Path)):
        return read_split_csv(splits, obs_names).to_numpy()
    ser = pd.Series(splits, dtype=object) if isinstance(splits, dict) else splits
    ser.index = ser.index.astype(str)
    missing = pd.Index(obs_names).difference(ser.index)
    if len(missing):
        raise DataError(f"{file}: splits: {len(missing)} cells have no split, e.g. {list(missing[:5])}")
    out = ser.reindex(pd.Index(obs_names)).to_numpy()
    bad = sorted({str(s) for s in out if not re.fullmatch(r"[A-Za-z0-9_]+", str(s))})
    if bad:
        raise DataError(f"{file}: splits: split names {bad[:5]} must be letters, digits or '_'")
    return out


# -- conversion -----------------------------------------------------------------------------------------------
def _plan(split_of: np.ndarray, samples_per_shard: int, block_rows: int, seed: int) -> list[dict[str, Any]]:
    import zlib

    names = [s for s in SPLIT_ORDER if s in set(split_of)] + sorted(set(split_of) - set(SPLIT_ORDER))
    jobs = []
    for split in names:
        rows = np.flatnonzero(split_of == split)
        blocks = [rows[i:i + block_rows] for i in range(0, len(rows), block_rows)]
        salt = zlib.crc32(split.encode())
        perm = np.random.default_rng([seed, salt]).permutation(len(blocks))
        seq = np.concatenate([blocks[i] for i in perm]) if blocks else rows
        for k, lo in enumerate(range(0, len(seq), samples_per_shard)):
            part = seq[lo:lo + samples_per_shard]
            jobs.append({"split": split, "shard_no": k,
                         "rows": part[np.random.default_rng([seed, salt, k]).permutation(len(part))]})
    return jobs


def _metas(job: dict[str, Any], src: Any, lab: dict[str, Any], groups: tuple[str, ...]) -> list[dict[str, Any]]:
    """The json members (less nnz) of a shard's cells, in shard order."""
    doses, dinv = lab["doses"]
    out = []
    for r in job["rows"].tolist():
        comps, ds = lab["components"][lab["inv"][r]], doses[dinv[r]]
        out.append({"key": f"c{r:09d}", "cell_id": str(src.obs_names[r]), "row": r,
                    "perturbation": str(lab["perturbation"][r]), "components": comps,
                    **{c: str(lab[c][r]) for c in groups[1:]},
                    "dose": float(ds[0]) if ds else 0.0, "doses": [float(d) for d in ds], "is_control": not comps})
    return out


def _write_shard(job: dict[str, Any], metas: list[dict[str, Any]], src: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Read a shard's rows (sorted, in ranges), apply the x-state action, keep the gene list, write the shard."""
    rows, gene_pos = job["rows"], ctx["gene_pos"]
    order = np.argsort(rows, kind="stable")
    blk = _log1p_rows(_read_rows(src.X, rows[order]), ctx["x_state"])
    if len(gene_pos) != blk.shape[1] or np.any(gene_pos != np.arange(len(gene_pos))):
        blk = blk[:, gene_pos].tocsr()
    blk.eliminate_zeros()
    blk.sort_indices()
    pos_of = np.empty(len(rows), np.int64)
    pos_of[order] = np.arange(len(rows))  # shard position -> row of blk
    w = ExpressionShardWriter(ctx["out"], job["split"], len(rows), ctx["groups"], start_shard=job["shard_no"])
    try:
        for p, meta in enumerate(metas):
            a, b = blk.indptr[pos_of[p]], blk.indptr[pos_of[p] + 1]
            w.write(blk.indices[a:b], blk.data[a:b], {**meta, "n_genes": len(gene_pos)})
        recs = w.close()
    except BaseException:
        w.abort()
        raise
    return {"split": job["split"], "record": recs[0], "labels": w.label_counts}


_WORKER: dict[str, Any] = {}


def _worker_job(job: dict[str, Any], metas: list[dict[str, Any]], path: str, ctx: dict[str, Any]) -> dict[str, Any]:
    if _WORKER.get("path") != path:  # one h5py handle per worker process
        _WORKER.update(path=path, src=_H5Source(Path(path), ctx["cols"]))
    return _write_shard(job, metas, _WORKER["src"], ctx)


def _run(jobs: list[dict[str, Any]], src: Any, lab: dict[str, Any], ctx: dict[str, Any], path: str | None,
         workers: int) -> list[dict[str, Any]]:
    """One job per shard; with workers (spawned), at most 2 jobs per worker in flight (bounded memory)."""
    if workers <= 1 or len(jobs) <= 1 or path is None:
        return [_write_shard(j, _metas(j, src, lab, ctx["groups"]), src, ctx) for j in jobs]
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    results: dict[int, dict[str, Any]] = {}
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as ex:
        pending: dict[Any, int] = {}
        for i, j in enumerate(jobs):
            pending[ex.submit(_worker_job, j, _metas(j, src, lab, ctx["groups"]), path, ctx)] = i
            while len(pending) >= 2 * workers or (i == len(jobs) - 1 and pending):
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    results[pending.pop(f)] = f.result()
    return [results[i] for i in range(len(jobs))]


def convert_anndata(source: Any, out_dir: str | Path, columns: ExpressionColumns | None = None,
                    genes: list[str] | None = None, splits: Any = None, samples_per_shard: int = 4096,
                    max_combination: int = 2, workers: int = 1, *, x_state: str = "auto", seed: int = 0,
                    block_rows: int = 64, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    unmeasured: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Convert an .h5ad path (read through h5py, on disk) or an AnnData object to expression shards in
    `out_dir`; returns the manifest (also written to out_dir/manifest.json). `genes`: the kept gene list in
    order (None = every var name); `splits`: {cell id: split}, a pd.Series, a split CSV path
    (expression_splits) or None (all train); `x_state`: see expression_prep.detect_x_state (counts are
    normalised to 1e4 and logged, normalised data logged, log1p data kept). `workers` > 1 runs one shard per
    job in spawned processes (a path source only; an AnnData object is converted in this process).
    `unmeasured`: an atlas's {dataset name: positions in `genes` that dataset does not measure}, stored in the
    manifest (`unmeasured_genes`) so that training leaves them out of that dataset's loss."""
    from .convert import _remove_outputs
    from .expression_prep import detect_x_state

    t0 = time.perf_counter()
    cols = columns or ExpressionColumns()
    if samples_per_shard < 1 or max_combination < 1 or block_rows < 1:
        raise ValueError("samples_per_shard, max_combination and block_rows must be >= 1")
    src, file = _open(source, cols)
    groups = _groups(cols)
    rep = validate_expression(src, replace(cols, counts_layer=None), file, chunk_rows=chunk_rows)
    dec = detect_x_state(src, file, x_state, chunk_rows)
    names = list(map(str, src.var_names))
    gene_list = names if genes is None else [str(g) for g in genes]
    where = {g: i for i, g in enumerate(names)}
    missing = [g for g in gene_list if g not in where]
    if missing or len(set(gene_list)) != len(gene_list) or not gene_list:
        why = f"{len(missing)} not in var_names, e.g. {missing[:5]}" if missing else "duplicated or empty"
        raise DataError(f"{file}: gene list ({len(gene_list)} genes): {why}")
    lab = _labels(src, cols, file, max_combination)
    split_of = _splits(splits, src.obs_names, file)
    comps = {c for cs in lab["components"] for c in cs}
    vocabs = {"perturbation": Vocab.build(comps | {cols.control}, name="perturbation", first=cols.control)}
    vocabs.update({g: Vocab.build(lab[g], name=g) for g in groups[1:]})
    ctx = {"gene_pos": np.asarray([where[g] for g in gene_list], np.int64), "groups": groups,
           "cols": cols, "x_state": dec.state, "out": str(out_dir)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # written last: a folder with a manifest is complete
    for old in [*out.glob("*.tar"), *out.glob("*.idx"), *out.glob("*.labels.json")]:
        old.unlink()
    jobs = _plan(split_of, samples_per_shard, block_rows, seed)
    is_path = isinstance(source, (str, Path))
    if workers > 1 and not is_path:
        log.info("%s: an AnnData object is converted in this process (workers need a file path)", file)
    try:
        results = _run(jobs, src, lab, ctx, file if is_path else None, workers)
    except BaseException:
        _remove_outputs(out, jobs)
        raise
    records: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for r in results:
        records.setdefault(r["split"], []).append(r["record"])
        c = counts.setdefault(r["split"], {g: {} for g in groups})
        for g, cnt in r["labels"].items():
            for k, v in cnt.items():
                c[g][k] = c[g].get(k, 0) + v
    manifest = {
        "format": FORMAT, "version": VERSION, "modality": "expression", "encoding": "csr", "dtype": "float32",
        "values": "log1p", "genes": gene_list, "n_genes": len(gene_list), "max_combination": max_combination,
        "label_groups": list(groups), "covariates": list(cols.covariates), "columns": asdict(cols),
        "vocabs": {g: v.names for g, v in vocabs.items()},
        "splits": {s: {"count": sum(x["count"] for x in recs), "shards": recs} for s, recs in records.items()},
        "label_counts": {s: {g: dict(sorted(c.items())) for g, c in v.items()} for s, v in counts.items()},
        "unmeasured_genes": {str(d): sorted(map(int, v)) for d, v in (unmeasured or {}).items() if len(v)},
        "source": {"kind": "anndata", "file": file,
                   "bytes": Path(file).stat().st_size if is_path else None,
                   "n_cells": int(src.n_obs), "n_genes": int(src.n_vars), "x_state": asdict(dec),
                   "split_csv": str(splits) if isinstance(splits, (str, Path)) else None,
                   "samples_per_shard": samples_per_shard, "block_rows": block_rows, "seed": seed,
                   "report": rep.counts(), "seconds": round(time.perf_counter() - t0, 2)},
    }
    write_manifest(out, manifest)
    log.info("%s: %d cells x %d genes -> %s (%s) in %.1fs", file, src.n_obs, len(gene_list), out,
             ", ".join(f"{s}: {v['count']}" for s, v in manifest["splits"].items()), time.perf_counter() - t0)
    return manifest


def convert_cli(args: Any) -> dict[str, Any]:
    """`phenoflow data convert anndata ...`: parse --columns FIELD=VALUE and --genes, convert, summarise."""
    if not args.h5ad:
        raise DataError("data convert anndata: --h5ad FILE is required")
    fields: dict[str, Any] = {}
    for pair in args.columns:
        k, sep, v = pair.partition("=")
        if not sep or k not in ExpressionColumns.__dataclass_fields__:
            raise DataError(f"data convert anndata: --columns {pair!r}: expected FIELD=VALUE with FIELD one of "
                            f"{list(ExpressionColumns.__dataclass_fields__)}")
        fields[k] = (tuple(x for x in v.split(",") if x) if k == "covariates"
                     else None if v.lower() in ("", "none") and k in ("dose", "dataset", "counts_layer") else v)
    genes = None
    if args.genes:
        text = Path(args.genes).read_text()
        genes = json.loads(text) if text.lstrip().startswith("[") else [g.strip() for g in text.splitlines()
                                                                         if g.strip()]
    m = convert_anndata(args.h5ad, args.out, ExpressionColumns(**fields), genes, args.split_csv,
                        args.samples_per_shard or 4096, args.max_combination, args.workers, x_state=args.x_state,
                        seed=args.seed)
    return {"out": str(args.out), "cells": m["source"]["n_cells"], "genes": m["n_genes"],
            "x_state": m["source"]["x_state"]["state"], "seconds": m["source"]["seconds"],
            "splits": {s: {"count": v["count"], "shards": len(v["shards"])} for s, v in m["splits"].items()},
            "vocab_sizes": {g: len(v) for g, v in m["vocabs"].items()}}
