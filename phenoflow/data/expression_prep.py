"""Expression preprocessing (scanpy) and atlas alignment.

`prepare_expression(adata, cols)` = detect what ``.X`` holds (`detect_x_state`) -> normalize_total(1e4) +
log1p unless ``.X`` is already log-normalised -> highly variable genes united with the perturbations' target
genes -> the kept gene list. Every decision is recorded in the returned `PrepResult` and logged.

Log detection rule (`detect_x_state`, one chunked pass over ``.X``; ``x_state=`` overrides it):

1. all stored values are integers -> ``counts``: normalise and log1p (a counts layer is made from ``.X``
   first when the file has none, so seurat_v3 can use it);
2. otherwise, max <= 20 -> ``log1p``: skip normalisation (log1p of counts normalised to 1e4 tops out near 9.2,
   to 1e6 near 13.8; a value above 20 would be expm1 = 5e8 counts). ``uns['log1p']`` and the spread of the
   expm1 row sums are recorded as supporting evidence, not required: on a gene subset (the fixture keeps 500
   genes) the expm1 row sums are NOT constant, so a "row sums equal 1e4" rule would call real log data raw;
3. otherwise, row sums within 5% of each other -> ``normalized`` (normalised, not logged): log1p only;
4. anything else (non-integer, max > 20, uneven row sums; or ``uns['log1p']`` with max > 20) -> `DataError`
   asking for ``x_state=``: phenoflow does not guess.

Gene selection: seurat_v3 on the counts layer when there is one (scikit-misc needed; without it, seurat on
the log data, logged and recorded), else seurat on the log data; ``n_top`` (default 4,000) capped at the gene
count (all candidates kept, no selection, when n_top is not smaller); genes detected in fewer than
``min_cells`` (default 1) cells are not candidates; then every perturbation target gene found in var_names (combination components split on the separator)
is added. `PrepResult.genes` is the kept list in the data's order.

Atlas (`align_datasets`): see its docstring (default: union of genes with a per-dataset mask).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .anndata_io import (
    DEFAULT_CHUNK_ROWS,
    ExpressionColumns,
    ExpressionReport,
    matrix_stats,
    perturbation_targets,
    validate_expression,
)
from .errors import DataError

log = logging.getLogger("phenoflow.data")

XState = Literal["auto", "counts", "normalized", "log1p"]
LOG_MAX = 20.0             # rule 2
ROW_SUM_REL_SPREAD = 0.05  # rule 3: (max - min) / median of the row sums
TARGET_SUM = 1e4


@dataclass
class XStateDecision:
    state: str            # "counts" | "normalized" | "log1p"
    action: str           # "normalize_total+log1p" | "log1p" | "none"
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def detect_x_state(adata: Any, file: str = "<AnnData>", x_state: XState = "auto",
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> XStateDecision:
    """What ``.X`` holds and what to do about it (module docstring, rules 1-4)."""
    actions = {"counts": "normalize_total+log1p", "normalized": "log1p", "log1p": "none"}
    if x_state != "auto":
        if x_state not in actions:
            raise DataError(f"{file}: x_state must be auto, counts, normalized or log1p, not {x_state!r}")
        return XStateDecision(x_state, actions[x_state], f"x_state={x_state!r} given by the caller")
    st = matrix_stats(adata.X, adata.n_obs, chunk_rows)
    has_flag = "log1p" in getattr(adata, "uns", {})
    esum = st.expm1_row_sums[st.expm1_row_sums > 0]
    rsum = st.row_sums[st.row_sums > 0]

    def spread(v):
        return float((v.max() - v.min()) / np.median(v)) if v.size else 0.0

    ev = {"min": st.min, "max": st.max, "all_integer": st.all_integer, "uns_log1p": has_flag,
          "expm1_row_sum_spread": spread(esum), "row_sum_spread": spread(rsum),
          "expm1_row_sum_median": float(np.median(esum)) if esum.size else 0.0}
    if st.nonfinite or st.negative:
        raise DataError(f"{file}: .X holds {st.nonfinite} non-finite and {st.negative} negative values: "
                        "cannot tell counts from log data (validate_expression names the first one)")
    if st.all_integer:
        if has_flag and st.max > 0:
            raise DataError(f"{file}: .X holds only integers (counts?) but uns['log1p'] says it is log1p data; "
                            "pass x_state='counts' or 'log1p'")
        return XStateDecision("counts", actions["counts"], f"integer values (max {st.max:g}): raw counts", ev)
    if st.max <= LOG_MAX:
        why = (f"non-integer values with max {st.max:.3g} <= {LOG_MAX:g}: already log-normalised"
               f"{'; uns[log1p] present' if has_flag else ''} (expm1 row sums: median "
               f"{ev['expm1_row_sum_median']:.4g}, spread {ev['expm1_row_sum_spread']:.2f})")
        return XStateDecision("log1p", actions["log1p"], why, ev)
    if has_flag:
        raise DataError(f"{file}: uns['log1p'] says .X is log1p data but its max is {st.max:.4g} > {LOG_MAX:g}; "
                        "pass x_state='counts', 'normalized' or 'log1p'")
    if ev["row_sum_spread"] <= ROW_SUM_REL_SPREAD:
        return XStateDecision("normalized", actions["normalized"], f"non-integer values, max {st.max:.4g}, row "
                              f"sums within {ROW_SUM_REL_SPREAD:.0%} (median {np.median(rsum):.4g}): normalised, "
                              "not logged", ev)
    raise DataError(f"{file}: cannot tell what .X holds (non-integer, max {st.max:.4g} > {LOG_MAX:g}, row sums "
                    f"spread {ev['row_sum_spread']:.2f}); pass x_state='counts', 'normalized' or 'log1p'")


@dataclass
class PrepResult:
    adata: Any                 # preprocessed AnnData restricted to `genes`
    genes: list[str]           # kept genes, in the data's order (store with the run and the export)
    x_state: XStateDecision
    hvg_flavor: str
    hvg_genes: list[str]
    targets_added: list[str]   # target genes kept although not highly variable
    report: ExpressionReport
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"genes": self.genes, "n_genes": len(self.genes), "x_state": self.x_state.state,
                "normalisation": self.x_state.action, "reason": self.x_state.reason,
                "hvg_flavor": self.hvg_flavor, "n_hvg": len(self.hvg_genes), "targets_added": self.targets_added,
                "notes": self.notes, "report": self.report.to_json()}


def _has_skmisc() -> bool:
    try:
        import skmisc.loess  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_expression(adata: Any, cols: ExpressionColumns | None = None, *, n_top_genes: int = 4000,
                       x_state: XState = "auto", file: str | None = None, report: ExpressionReport | None = None,
                       targets_are_genes: bool = True, subset: bool = True, min_cells: int = 1,
                       chunk_rows: int = DEFAULT_CHUNK_ROWS) -> PrepResult:
    """Normalise/log (unless already log-normalised), select genes; returns a new AnnData (input untouched).

    A backed AnnData is loaded into memory first (logged): scanpy works in memory; stream large files
    through the shard converter instead.
    """
    import scanpy as sc

    cols = cols or ExpressionColumns()
    file = file or (report.file if report else str(getattr(adata, "filename", None) or "<AnnData>"))
    rep = report or validate_expression(adata, cols, file, targets_are_genes=targets_are_genes,
                                        chunk_rows=chunk_rows)
    notes: list[str] = []
    if adata.isbacked:
        log.info("%s: backed AnnData loaded into memory for preprocessing (%d x %d)", file, adata.n_obs,
                 adata.n_vars)
        notes.append("backed file loaded into memory for preprocessing")
        adata = adata.to_memory()
    else:
        adata = adata.copy()
    dec = detect_x_state(adata, file, x_state, chunk_rows)
    layer = cols.counts_layer
    if dec.state == "counts" and layer is not None and layer not in adata.layers:
        adata.layers[layer] = adata.X.copy()
        notes.append(f"layers[{layer!r}] made from the raw counts in .X")
    if not np.issubdtype(adata.X.dtype, np.floating):
        adata.X = adata.X.astype(np.float32)
    if dec.action == "normalize_total+log1p":
        sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
        sc.pp.log1p(adata)
        log.info("%s: .X %s -> normalize_total(%g) + log1p", file, dec.reason, TARGET_SUM)
    elif dec.action == "log1p":
        sc.pp.log1p(adata)
        log.info("%s: .X %s -> log1p only", file, dec.reason)
    else:
        adata.uns.setdefault("log1p", {"base": None})
        log.info("%s: .X %s -> normalisation and log1p SKIPPED", file, dec.reason)

    names = list(map(str, adata.var_names))
    targets: set[str] = set()
    if targets_are_genes:
        present = set(names)
        targets = {g for g in perturbation_targets(adata.obs[cols.perturbation].astype(str), cols) if g in present}
    is_target = np.isin(names, sorted(targets))
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel() >= min_cells
    if (~detected).any():
        notes.append(f"{int((~detected).sum())} genes detected in fewer than {min_cells} cells dropped")
        log.info("%s: %d genes detected in fewer than %d cell(s): not candidates for selection", file,
                 int((~detected).sum()), min_cells)
    cand = adata[:, detected]
    n_top = int(min(n_top_genes, cand.n_vars))
    counts_ok = layer is not None and layer in adata.layers and not rep.of_kind("noninteger_counts")
    if n_top >= cand.n_vars:
        flavor = "all"
        hv_c = np.ones(cand.n_vars, dtype=bool)
        notes.append(f"n_top_genes {n_top_genes} >= {cand.n_vars} candidate genes: all kept, no selection")
    else:
        cand = cand.copy()
        if counts_ok and _has_skmisc():
            flavor = "seurat_v3"
            sc.pp.highly_variable_genes(cand, n_top_genes=n_top, flavor="seurat_v3", layer=layer)
        else:
            flavor = "seurat"
            if counts_ok:
                notes.append("seurat_v3 needs scikit-misc (not installed): seurat on log data used instead")
                log.warning("%s: scikit-misc not installed: highly variable genes by seurat on log data, not "
                            "seurat_v3 on counts", file)
            sc.pp.highly_variable_genes(cand, n_top_genes=n_top, flavor="seurat")
        hv_c = cand.var["highly_variable"].to_numpy(bool)
    hv = np.zeros(len(names), dtype=bool)
    hv[np.flatnonzero(detected)[hv_c]] = True
    adata.var["highly_variable"] = hv
    hvg = [g for g, k in zip(names, hv) if k]
    keep = hv | is_target
    added = [g for g, k in zip(names, hv) if not k and g in targets]
    adata.var["perturbation_target"] = is_target
    genes = [g for g, k in zip(names, keep) if k]
    log.info("%s: %d genes kept: %d highly variable (%s, n_top %d) + %d target genes", file, len(genes), len(hvg),
             flavor, n_top, len(added))
    if subset:
        adata = adata[:, keep].copy()
    adata.uns["phenoflow_prep"] = {"x_state": dec.state, "normalisation": dec.action, "reason": dec.reason,
                                   "hvg_flavor": flavor, "n_top_genes": n_top, "targets_added": added}
    return PrepResult(adata, genes, dec, flavor, hvg, added, rep, notes)


# -- atlas -------------------------------------------------------------------------------------------------
@dataclass
class AlignedAtlas:
    adata: Any                 # all cells on one gene axis; obs[dataset column] names the source
    genes: list[str]           # the gene vocabulary (the gene axis)
    datasets: list[str]        # row order of `mask`
    mask: np.ndarray           # (datasets, genes) bool: gene measured in that dataset
    mode: str                  # "union" | "intersection"
    dropped: dict[str, int]    # per dataset: genes not in the vocabulary (dropped)

    def cell_mask(self, dataset_column: str = "dataset") -> np.ndarray:
        """(cells, genes) bool mask for a masked loss (row = the mask of the cell's dataset)."""
        idx = {d: i for i, d in enumerate(self.datasets)}
        rows = np.array([idx[str(d)] for d in self.adata.obs[dataset_column]], dtype=np.int64)
        return self.mask[rows]


def align_datasets(datasets: dict[str, Any], mode: Literal["union", "intersection"] = "union",
                   genes: list[str] | None = None, cols: ExpressionColumns | None = None) -> AlignedAtlas:
    """Put several AnnData objects (already preprocessed alike) on one gene vocabulary.

    ``mode="union"`` (the default): every gene measured in any dataset; a gene a dataset lacks is stored as 0
    and marked False in the per-dataset mask (``AlignedAtlas.mask``, also ``adata.varm['dataset_mask']``,
    columns in ``adata.uns['atlas_datasets']`` order) so the loss skips it (``loss * mask`` summed over genes,
    divided by the mask's sum). ``mode="intersection"``: only genes every dataset measures; no mask needed.

    Why union by default: perturbation atlases come from different panels and gene filters, and their
    intersection shrinks fast with each dataset added (two datasets selected on their own highly variable
    genes may share a few hundred of 4,000); it would drop most datasets' target genes, the genes a
    perturbation model most needs, and leave a finetuning target's own genes off the pretrained gene axis.
    The union keeps every measured value; the mask keeps the unmeasured zeros out of the loss (an unmasked
    zero would teach the model that the gene is silent). Intersection stays available for models that cannot
    take a mask, and when the datasets share nearly all genes anyway.

    ``genes`` fixes the vocabulary instead (e.g. the pretrained model's gene axis when finetuning): genes
    outside it are dropped (counted in ``dropped``, logged), genes it has that a dataset lacks are masked.
    Vocabulary order: ``genes`` as given, else sorted names (independent of the datasets' order).
    The dataset name (the dict key) is written to ``obs[cols.dataset]`` and becomes a covariate; obs_names
    are prefixed ``<dataset>:`` so they stay unique. The counts layer is aligned too when every dataset has it.
    """
    import anndata as ad
    import scipy.sparse as sp

    cols = cols or ExpressionColumns()
    dcol = cols.dataset or "dataset"
    if not datasets:
        raise DataError("align_datasets: no datasets given")
    if mode not in ("union", "intersection"):
        raise DataError(f"align_datasets: mode must be 'union' or 'intersection', not {mode!r}")
    names = [str(k) for k in datasets]
    layer = cols.counts_layer
    if layer is not None and not all(layer in a.layers for a in datasets.values()):
        layer = None  # a counts layer is kept only when every dataset has one
    gene_sets = {}
    for name, a in datasets.items():
        vn = list(map(str, a.var_names))
        if len(set(vn)) != len(vn):
            raise DataError(f"dataset {name!r}: duplicated var_names; make them unique before aligning")
        gene_sets[str(name)] = vn
    if genes is not None:
        vocab = list(map(str, genes))
    elif mode == "union":
        vocab = sorted(set().union(*map(set, gene_sets.values())))
    else:
        vocab = sorted(set.intersection(*map(set, gene_sets.values())))
    if not vocab:
        raise DataError(f"align_datasets: the {mode} of the datasets' genes is empty ({names})")
    pos = {g: i for i, g in enumerate(vocab)}
    mask = np.zeros((len(names), len(vocab)), dtype=bool)
    parts, dropped = [], {}
    for d, (name, a) in enumerate(zip(names, datasets.values())):
        src = np.array([i for i, g in enumerate(gene_sets[name]) if g in pos], dtype=np.int64)
        dst = np.array([pos[gene_sets[name][i]] for i in src], dtype=np.int64)
        dropped[name] = a.n_vars - src.size
        if dropped[name]:
            log.info("atlas: dataset %r: %d of %d genes not in the %s gene vocabulary (dropped)", name,
                     dropped[name], a.n_vars, "given" if genes is not None else mode)
        mask[d, dst] = True
        # scatter the kept columns onto the vocabulary axis (a column permutation, zeros elsewhere)
        proj = sp.csr_matrix((np.ones(src.size, np.float32), (np.arange(src.size), dst)),
                             shape=(src.size, len(vocab)))

        def place(m, src=src, proj=proj):
            return (sp.csr_matrix(m[:, src] if src.size else sp.csr_matrix((m.shape[0], 0)),
                                  dtype=np.float32) @ proj).tocsr()
        obs = a.obs.copy()
        if dcol in obs.columns and not (obs[dcol].astype(str) == name).all():
            obs[f"{dcol}_original"] = obs[dcol].astype(str)
        obs[dcol] = name
        obs.index = [f"{name}:{i}" for i in a.obs_names]
        layers = {layer: place(a.layers[layer])} if layer else {}
        parts.append(ad.AnnData(X=place(a.X), obs=obs, layers=layers))
    out = ad.concat(parts, join="outer", merge=None)
    out.var_names = vocab
    out.obs[dcol] = out.obs[dcol].astype("category")
    out.varm["dataset_mask"] = mask.T.copy()
    out.uns["atlas_datasets"] = list(names)
    out.uns["atlas_mode"] = mode
    log.info("atlas: %d datasets, %d cells, %s of genes = %d (per dataset measured: %s)", len(names), out.n_obs,
             mode, len(vocab), dict(zip(names, mask.sum(1).tolist())))
    return AlignedAtlas(out, vocab, names, mask, mode, dropped)
