"""Reading and checking single-cell perturbation data in AnnData (``.h5ad``) files.

Column names follow PerturBench by default (`ExpressionColumns`): perturbation in ``obs['condition']``,
control label ``control``, combinations joined by ``+`` (``"KLF1+MAP2K6"``), covariates ``['cell_type']``,
dose in ``obs['dose']``, source data set in ``obs['dataset']``, raw counts in ``layers['counts']``.

`read_expression(path)` reads a file in memory, or backed (``backed=True``: ``.X`` stays on disk and is read
in row chunks; anndata still loads ``obs``, ``var`` and the layers into memory, so for a large file with a
counts layer pass ``ExpressionColumns(counts_layer=None)`` or convert it to shards), and checks it with
`validate_expression`. Every bad input is either a `DataError` that names the file, the column (or matrix)
and the value, or a counted entry in the returned `ExpressionReport` that is also logged:

| input | outcome |
|---|---|
| a perturbation or covariate column absent | error (lists the columns present) |
| no control cell; a covariate value without control cells | error (names the covariate values) |
| NaN/inf in ``.X`` or the counts layer | error (count, first cell and gene) |
| negative values in the counts layer, or in ``.X`` | error (count, first cell and gene) |
| duplicated ``var_names`` or ``obs_names`` | error (lists the duplicates) |
| a dose that is not a number (per combination component) | error (row, value) |
| a perturbation target gene absent from ``var_names`` | report entry ``missing_target`` (kept as a label) |
| dose or dataset column absent; no counts layer; a counts layer with non-integer values | report entry |

Vocabularies (`build_expression_vocabs`) reuse `phenoflow.data.vocab.Vocab`: the perturbation vocabulary holds
the control first, then every single component AND every combination string, sorted, so a model can use
one-hot rows for combinations or multi-hot rows over components.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .vocab import Vocab

log = logging.getLogger("phenoflow.data")

DEFAULT_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class ExpressionColumns:
    """Where the labels of an AnnData file live (defaults: PerturBench's conventions)."""

    perturbation: str = "condition"
    control: str = "control"
    separator: str = "+"
    covariates: tuple[str, ...] = ("cell_type",)
    dose: str | None = "dose"
    dataset: str | None = "dataset"
    counts_layer: str | None = "counts"

    def __post_init__(self):
        covs = (self.covariates,) if isinstance(self.covariates, str) else tuple(self.covariates)
        object.__setattr__(self, "covariates", covs)
        if not self.separator:
            raise ValueError("ExpressionColumns.separator must be a non-empty string")

    def components(self, label: str) -> list[str]:
        """The single perturbations of a label: ``"A+B" -> ["A", "B"]``; control parts are dropped."""
        return [p.strip() for p in str(label).split(self.separator) if p.strip() and p.strip() != self.control]

    def is_combination(self, label: str) -> bool:
        return len(self.components(label)) > 1


@dataclass
class ReportEntry:
    kind: str          # e.g. "missing_target", "no_dose_column", "noninteger_counts"
    message: str
    column: str | None = None
    value: Any = None
    count: int = 0
    labels: list[str] = field(default_factory=list)  # e.g. the perturbation labels naming a missing target


@dataclass
class ExpressionReport:
    """What `validate_expression` found that is not an error: counted entries, each also logged."""

    file: str
    n_cells: int = 0
    n_genes: int = 0
    entries: list[ReportEntry] = field(default_factory=list)

    def add(self, kind: str, message: str, column: str | None = None, value: Any = None, count: int = 0,
            labels: Iterable[str] = (), level: int | None = logging.WARNING) -> None:
        self.entries.append(ReportEntry(kind, message, column, value, int(count), list(labels)))
        if level is not None:
            log.log(level, "%s: %s", self.file, message)

    def of_kind(self, kind: str) -> list[ReportEntry]:
        return [e for e in self.entries if e.kind == kind]

    def counts(self) -> dict[str, int]:
        """Number of entries per kind."""
        return dict(Counter(e.kind for e in self.entries))

    @property
    def missing_targets(self) -> dict[str, list[str]]:
        """Target gene absent from var_names -> the perturbation labels that name it."""
        return {e.value: list(e.labels) for e in self.of_kind("missing_target")}

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "n_cells": self.n_cells, "n_genes": self.n_genes,
                "counts": self.counts(), "entries": [asdict(e) for e in self.entries]}


# -- matrices ---------------------------------------------------------------------------------------------
def iter_row_chunks(matrix: Any, n_rows: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, Any]]:
    """(first row, block) over a dense, sparse or backed (on-disk) matrix; memory bounded by one block."""
    for start in range(0, n_rows, chunk_rows):
        yield start, matrix[start:min(start + chunk_rows, n_rows)]


@dataclass
class MatrixStats:
    """One pass over a matrix: range, integrality, non-finite and negative entries, row sums."""

    min: float = np.inf
    max: float = -np.inf
    nonfinite: int = 0
    first_nonfinite: tuple[int, int] | None = None
    negative: int = 0
    first_negative: tuple[int, int] | None = None
    all_integer: bool = True
    row_sums: np.ndarray = field(default_factory=lambda: np.zeros(0))
    expm1_row_sums: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _first(block: Any, mask_fn) -> tuple[int, int] | None:
    import scipy.sparse as sp

    if sp.issparse(block):
        coo = block.tocoo()
        hit = np.flatnonzero(mask_fn(coo.data))
        return (int(coo.row[hit[0]]), int(coo.col[hit[0]])) if hit.size else None
    rows, cols = np.nonzero(mask_fn(np.asarray(block)))
    return (int(rows[0]), int(cols[0])) if rows.size else None


def matrix_stats(matrix: Any, n_rows: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> MatrixStats:
    import scipy.sparse as sp

    st = MatrixStats()
    sums, esums = [], []
    for start, block in iter_row_chunks(matrix, n_rows, chunk_rows):
        vals = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if sp.issparse(block) and block.nnz < block.shape[0] * block.shape[1]:
            st.min, st.max = min(st.min, 0.0), max(st.max, 0.0)  # implicit zeros
        vals = np.asarray(vals, dtype=np.float64)
        bad = ~np.isfinite(vals)
        if bad.any():
            st.nonfinite += int(bad.sum())
            if st.first_nonfinite is None:
                r, c = _first(block, lambda v: ~np.isfinite(v))  # type: ignore[misc]
                st.first_nonfinite = (start + r, c)
        fin = vals[~bad]
        if fin.size:
            st.min, st.max = min(st.min, float(fin.min())), max(st.max, float(fin.max()))
            neg = fin < 0
            if neg.any():
                st.negative += int(neg.sum())
                if st.first_negative is None:
                    r, c = _first(block, lambda v: v < 0)  # type: ignore[misc]
                    st.first_negative = (start + r, c)
            if st.all_integer and not np.all(fin == np.round(fin)):
                st.all_integer = False
        blk = block if sp.issparse(block) else np.asarray(block, dtype=np.float64)
        sums.append(np.asarray(blk.sum(axis=1)).ravel())
        if sp.issparse(blk):
            e = blk.copy().astype(np.float64)
            e.data = np.expm1(np.clip(e.data, None, 700))
        else:
            e = np.expm1(np.clip(np.nan_to_num(blk), None, 700))
        esums.append(np.asarray(e.sum(axis=1)).ravel())
    st.row_sums = np.concatenate(sums) if sums else np.zeros(0)
    st.expm1_row_sums = np.concatenate(esums) if esums else np.zeros(0)
    return st


# -- validation -------------------------------------------------------------------------------------------
def _require_columns(adata: Any, cols: ExpressionColumns, file: str) -> None:
    present = list(adata.obs.columns)
    for role, name in [("perturbation", cols.perturbation)] + [("covariates", c) for c in cols.covariates]:
        if name not in adata.obs.columns:
            raise DataError(f"{file}: obs column {name!r} (ExpressionColumns.{role}) not found; "
                            f"obs columns present: {present}")


def _check_duplicates(names: Iterable[str], what: str, file: str) -> None:
    counts = Counter(map(str, names))
    dup = sorted(n for n, k in counts.items() if k > 1)
    if dup:
        raise DataError(f"{file}: {len(dup)} duplicated {what} (e.g. {dup[:10]}); make them unique "
                        f"(e.g. AnnData.{what}_make_unique()) before reading")


def _check_matrix(st: MatrixStats, what: str, adata: Any, file: str, *, negative_ok: bool = False) -> None:
    def where(rc):
        return f"first at cell {adata.obs_names[rc[0]]!r}, gene {adata.var_names[rc[1]]!r}"

    if st.nonfinite:
        raise DataError(f"{file}: {what} holds {st.nonfinite} non-finite values (NaN/inf), "
                        f"{where(st.first_nonfinite)}")
    if st.negative and not negative_ok:
        kind = "negative counts" if "layers" in what else ("negative values (scaled data? phenoflow needs "
                                                           "counts or log-normalised expression)")
        raise DataError(f"{file}: {what} holds {st.negative} {kind}, {where(st.first_negative)}")


def _check_controls(adata: Any, cols: ExpressionColumns, file: str, per_covariate: bool) -> None:
    pert = adata.obs[cols.perturbation].astype(str)
    is_ctrl = pert == cols.control
    if not is_ctrl.any():
        top = pert.value_counts().index[:8].tolist()
        raise DataError(f"{file}: column {cols.perturbation!r} has no control cells (label {cols.control!r}; "
                        f"most frequent labels: {top}); set ExpressionColumns.control")
    if per_covariate and cols.covariates:
        keys = adata.obs[list(cols.covariates)].astype(str)
        have = set(map(tuple, keys[is_ctrl.to_numpy()].to_numpy()))
        lacking = sorted({t for t in map(tuple, keys.to_numpy()) if t not in have})
        if lacking:
            shown = [dict(zip(cols.covariates, t)) for t in lacking[:10]]
            raise DataError(f"{file}: no control cells ({cols.perturbation}={cols.control!r}) for "
                            f"{len(lacking)} value(s) of covariate column(s) {list(cols.covariates)}: {shown}")


def parse_dose(value: Any, n_components: int, separator: str = "+") -> tuple[float, ...] | None:
    """Dose per component: ``"1+0.5"`` -> (1.0, 0.5); one number for a combination is used for every
    component; empty / NaN -> None (no dose). Raises ValueError for a non-number or a component mismatch."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    s = str(value).strip()
    if s in ("", "nan", "None"):
        return None
    parts = [float(p) for p in s.split(separator)]
    if any(not np.isfinite(p) for p in parts):
        raise ValueError(f"non-finite dose {s!r}")
    n = max(n_components, 1)
    if len(parts) == 1:
        return tuple(parts * n)
    if len(parts) != n:
        raise ValueError(f"dose {s!r} has {len(parts)} parts for {n} perturbation components")
    return tuple(parts)


def _check_doses(adata: Any, cols: ExpressionColumns, file: str) -> None:
    bad = []
    labels = adata.obs[cols.perturbation].astype(str).to_numpy()
    for i, (lab, v) in enumerate(zip(labels, adata.obs[cols.dose].to_numpy())):
        try:
            parse_dose(v, len(cols.components(lab)), cols.separator)
        except ValueError as e:
            bad.append(f"cell {adata.obs_names[i]!r} ({cols.perturbation}={lab!r}) value {v!r}: {e}")
    if bad:
        raise DataError(f"{file}: column {cols.dose!r}: {len(bad)} bad dose value(s):\n  " + "\n  ".join(bad[:10]))


def perturbation_targets(labels: Iterable[str], cols: ExpressionColumns) -> dict[str, list[str]]:
    """Target gene (component) -> the perturbation labels that contain it (control excluded)."""
    out: dict[str, list[str]] = defaultdict(list)
    for lab in sorted({str(x) for x in labels}):
        for g in cols.components(lab):
            out[g].append(lab)
    return dict(out)


def validate_expression(adata: Any, cols: ExpressionColumns | None = None, file: str | None = None, *,
                        controls_per_covariate: bool = True, targets_are_genes: bool = True,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS) -> ExpressionReport:
    """Check an AnnData object (in memory or backed); raise `DataError` or return the report (see module doc)."""
    cols = cols or ExpressionColumns()
    file = file or str(getattr(adata, "filename", None) or "<AnnData>")
    rep = ExpressionReport(file=file, n_cells=int(adata.n_obs), n_genes=int(adata.n_vars))
    _require_columns(adata, cols, file)
    _check_duplicates(adata.var_names, "var_names", file)
    _check_duplicates(adata.obs_names, "obs_names", file)
    _check_controls(adata, cols, file, controls_per_covariate)
    if cols.dose is not None and cols.dose not in adata.obs.columns:
        rep.add("no_dose_column", f"obs column {cols.dose!r} (dose) absent: dose 0.0 for every cell",
                column=cols.dose, count=adata.n_obs)
    elif cols.dose is not None:
        _check_doses(adata, cols, file)
    if cols.dataset is not None and cols.dataset not in adata.obs.columns:
        rep.add("no_dataset_column", f"obs column {cols.dataset!r} (dataset) absent: every cell belongs to "
                f"dataset {Path(file).stem!r}", column=cols.dataset, value=Path(file).stem, count=adata.n_obs)
    _check_matrix(matrix_stats(adata.X, adata.n_obs, chunk_rows), ".X", adata, file)
    if cols.counts_layer is not None:
        if cols.counts_layer in adata.layers:
            st = matrix_stats(adata.layers[cols.counts_layer], adata.n_obs, chunk_rows)
            _check_matrix(st, f"layers[{cols.counts_layer!r}]", adata, file)
            if not st.all_integer:
                rep.add("noninteger_counts", f"layers[{cols.counts_layer!r}] holds non-integer values: not raw "
                        "counts (seurat_v3 gene selection expects counts)", column=cols.counts_layer)
        else:
            rep.add("no_counts_layer", f"no layers[{cols.counts_layer!r}] (raw counts); layers present: "
                    f"{list(adata.layers.keys())}", column=cols.counts_layer, level=logging.INFO)
    if targets_are_genes:
        genes = set(map(str, adata.var_names))
        labels = adata.obs[cols.perturbation].astype(str)
        targets = perturbation_targets(labels, cols)
        for gene, labs in targets.items():
            if gene not in genes:  # one entry per gene, logged together below
                rep.add("missing_target", f"target gene {gene!r} of {labs} is not in var_names (kept as a label)",
                        column=cols.perturbation, value=gene, count=int(labels.isin(labs).sum()), labels=labs,
                        level=None)
        miss = [e.value for e in rep.of_kind("missing_target")]
        if miss:
            log.warning("%s: %d of %d perturbation target genes are not in var_names (kept as labels, "
                        "counted in the report): %s", file, len(miss), len(targets), miss[:20])
    return rep


def read_expression(path: str | Path, cols: ExpressionColumns | None = None, *, backed: bool = False,
                    validate: bool = True, **kw: Any) -> tuple[Any, ExpressionReport]:
    """Read an ``.h5ad`` file (``backed=True``: ``.X`` stays on disk, mode 'r') and validate it."""
    import anndata as ad

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such AnnData file")
    try:
        adata = ad.read_h5ad(p, backed="r" if backed else None)
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{p}: cannot read as h5ad: {e}") from e
    rep = validate_expression(adata, cols, str(p), **kw) if validate else ExpressionReport(
        str(p), int(adata.n_obs), int(adata.n_vars))
    return adata, rep


# -- vocabularies -----------------------------------------------------------------------------------------
def perturbation_vocab(labels: Iterable[str], cols: ExpressionColumns | None = None) -> Vocab:
    """Control first, then every single component and every combination string, sorted."""
    cols = cols or ExpressionColumns()
    names: set[str] = set()
    for lab in {str(x) for x in labels}:
        names.add(lab)
        names.update(cols.components(lab))
    names.add(cols.control)
    return Vocab.build(names, name="perturbation", first=cols.control)


def build_expression_vocabs(obs: Any, cols: ExpressionColumns | None = None,
                            dataset_name: str | None = None) -> dict[str, Vocab]:
    """{'perturbation', one per covariate column, 'dataset'} vocabularies of an obs table."""
    cols = cols or ExpressionColumns()
    out = {"perturbation": perturbation_vocab(obs[cols.perturbation].astype(str), cols)}
    for c in cols.covariates:
        out[c] = Vocab.build(obs[c].astype(str), name=c)
    if cols.dataset is not None and cols.dataset not in cols.covariates:
        vals = obs[cols.dataset].astype(str) if cols.dataset in obs.columns else [dataset_name or "dataset"]
        out["dataset"] = Vocab.build(vals, name="dataset")
    return out


def gene_vocab(var_names: Iterable[str]) -> Vocab:
    """The gene axis, in the data's order (not sorted: the order is the model's gene axis)."""
    return Vocab(list(map(str, var_names)), name="gene")
