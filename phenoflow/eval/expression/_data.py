"""Inputs of the expression metrics: a cells x genes matrix in log1p space with per-cell labels.

`ExpressionSet` is the one container every metric in this package reads. It is built from an
`anndata.AnnData` (column names configurable, PerturBench defaults: perturbation in `obs['condition']`,
control label `control`, covariates such as `cell_type`) or from plain arrays. Matrices are densified to
float64 (the metrics are defined on small evaluation splits; a 6,000 x 500 split is 24 MB).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COV_DELIM = "_"  # PerturBench joins covariate values (and then the perturbation) with "_"


def _dense(x) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float64)


def check_log1p(x: np.ndarray, name: str) -> None:
    """Refuse data that is clearly not log1p-normalised expression (named in the error).

    Raw counts (every value an integer, some above 1) and values >= 15 (cell-eval refuses log data with
    max >= 15: log1p(3.3e6) is beyond any normalised library) are rejected instead of being silently
    transformed. Negative or non-finite values are rejected too.
    """
    if x.size == 0:
        raise ValueError(f"{name}: empty expression matrix")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: expression matrix has non-finite values")
    if x.min() < 0:
        raise ValueError(f"{name}: expression matrix has negative values ({x.min():.4g}); expected log1p data")
    if x.max() >= 15:
        raise ValueError(f"{name}: max value {x.max():.4g} >= 15; expected log1p-normalised data, not counts")
    if x.max() > 1 and np.all(x == np.round(x)):
        raise ValueError(f"{name}: all values are integers (raw counts?); normalise_total + log1p first")


@dataclass
class ExpressionSet:
    """A split of cells: `x` (cells x genes, log1p), `perturbation` and `covariate` per cell.

    `covariate` is the covariate columns' values joined with "_" (PerturBench's merge), "" when there are
    no covariate columns. `control` is the control label.
    """

    x: np.ndarray
    perturbation: np.ndarray
    covariate: np.ndarray
    genes: np.ndarray
    control: str = "control"
    name: str = "data"

    def __post_init__(self) -> None:
        self.x = _dense(self.x)
        n = self.x.shape[0]
        self.perturbation = np.asarray(self.perturbation).astype(str)
        if self.covariate is None:
            self.covariate = np.full(n, "", dtype=object)
        self.covariate = np.asarray(self.covariate).astype(str)
        self.genes = np.asarray(self.genes).astype(str)
        if self.x.ndim != 2:
            raise ValueError(f"{self.name}: expression must be 2-D (cells x genes), got shape {self.x.shape}")
        if len(self.perturbation) != n or len(self.covariate) != n:
            raise ValueError(f"{self.name}: {n} cells but {len(self.perturbation)} perturbation labels "
                             f"and {len(self.covariate)} covariate labels")
        if len(self.genes) != self.x.shape[1]:
            raise ValueError(f"{self.name}: {self.x.shape[1]} genes but {len(self.genes)} gene names")
        if len(set(self.genes)) != len(self.genes):
            raise ValueError(f"{self.name}: duplicated gene names")

    @classmethod
    def from_arrays(cls, x, perturbation, covariate=None, genes=None, control="control", name="data"):
        x = _dense(x)
        if genes is None:
            genes = [f"g{i}" for i in range(x.shape[1])]
        return cls(x, perturbation, covariate, genes, control=control, name=name)

    @classmethod
    def from_anndata(cls, adata, pert_col: str = "condition", control: str = "control",
                     covariate_cols=("cell_type",), name: str = "data") -> ExpressionSet:
        """Read `.X` (dense or sparse, log1p) and the label columns of an AnnData (or an h5ad path)."""
        if isinstance(adata, str):
            import anndata

            name = adata
            adata = anndata.read_h5ad(adata)
        obs = adata.obs
        for col in [pert_col, *covariate_cols]:
            if col not in obs.columns:
                raise ValueError(f"{name}: obs column {col!r} not found (columns: {list(obs.columns)}); "
                                 "pass pert_col=/covariate_cols= to name yours, covariate_cols=() for none")
        pert = obs[pert_col].astype(str).to_numpy()
        cov = None
        if covariate_cols:
            parts = [obs[c].astype(str).to_numpy() for c in covariate_cols]
            cov = parts[0].astype(object)
            for p in parts[1:]:
                cov = cov + COV_DELIM + p
        return cls(adata.X, pert, cov, adata.var_names.to_numpy(), control=control, name=name)

    # ---- groups -------------------------------------------------------------------------------
    def mask(self, pert: str, cov: str | None = None) -> np.ndarray:
        m = self.perturbation == pert
        if cov is not None:
            m &= self.covariate == cov
        return m

    def groups(self) -> list[tuple[str, str]]:
        """Sorted (covariate, perturbation) pairs of the non-control cells."""
        keep = self.perturbation != self.control
        pairs = set(zip(self.covariate[keep], self.perturbation[keep]))
        return sorted(pairs)

    def mean(self, pert: str, cov: str | None = None) -> np.ndarray:
        m = self.mask(pert, cov)
        if not m.any():
            where = f" in covariate {cov!r}" if cov is not None else ""
            raise ValueError(f"{self.name}: no cells of {pert!r}{where}")
        return self.x[m].mean(axis=0)

    def subset(self, m: np.ndarray) -> ExpressionSet:
        return ExpressionSet(self.x[m], self.perturbation[m], self.covariate[m], self.genes,
                             control=self.control, name=self.name)


def concat(a: ExpressionSet, b: ExpressionSet, name: str) -> ExpressionSet:
    return ExpressionSet(np.vstack([a.x, b.x]), np.concatenate([a.perturbation, b.perturbation]),
                         np.concatenate([a.covariate, b.covariate]), a.genes, control=a.control, name=name)


def check_pair(pred: ExpressionSet, ref: ExpressionSet) -> None:
    """Both splits must hold the same genes in the same order and the same control label."""
    if not np.array_equal(pred.genes, ref.genes):
        raise ValueError(f"{pred.name} and {ref.name} do not hold the same genes in the same order")
    if pred.control != ref.control:
        raise ValueError(f"control labels differ: {pred.control!r} vs {ref.control!r}")
    if not (ref.perturbation == ref.control).any():
        raise ValueError(f"{ref.name}: no control cells labelled {ref.control!r}")


def with_real_controls(pred: ExpressionSet, ref: ExpressionSet) -> ExpressionSet:
    """PerturBench's rule: drop the prediction's control cells and put the reference's real ones in."""
    check_pair(pred, ref)
    real_ctrl = ref.subset(ref.perturbation == ref.control)
    pred_pert = pred.subset(pred.perturbation != pred.control)
    return concat(pred_pert, real_ctrl, name=f"{pred.name} (real controls)")
