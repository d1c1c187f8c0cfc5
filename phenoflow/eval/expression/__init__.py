"""Expression metrics: PerturBench, Virtual Cell Challenge (cell-eval `vcc`) and distribution metrics.

`evaluate_expression(pred, ref)` returns one tidy table (pandas DataFrame, one row per metric,
aggregation, covariate and perturbation, with the convention in words); `summarize(table)` averages over
perturbations. Inputs are AnnData objects, h5ad paths or `ExpressionSet`s holding log1p expression;
column names default to PerturBench's (`condition`, control `control`, covariate `cell_type`).
Each metric's convention is in its module's docstring: `perturbench.py`, `vcc.py`, `distribution.py`.
"""
from __future__ import annotations

from ._data import ExpressionSet, check_log1p, with_real_controls
from .distribution import energy_distance, fit_pca, geomloss_energy, rbf_mmd2
from .perturbench import (
    cosine,
    perturbench_metrics,
    r2_score_perturbench,
    rank_scores,
    rmse,
    top_k_recall,
)
from .vcc import discrimination_score_l1, mae, overlap_at_n, vcc_metrics

COLUMNS = ["metric", "aggregation", "covariate", "perturbation", "value", "convention"]

__all__ = [
    "COLUMNS",
    "ExpressionSet",
    "check_log1p",
    "cosine",
    "discrimination_score_l1",
    "energy_distance",
    "evaluate_expression",
    "fit_pca",
    "geomloss_energy",
    "mae",
    "overlap_at_n",
    "perturbench_metrics",
    "r2_score_perturbench",
    "rank_scores",
    "rbf_mmd2",
    "rmse",
    "summarize",
    "top_k_recall",
    "vcc_metrics",
    "with_real_controls",
]


def _as_set(x, pert_col, control, covariate_cols, name) -> ExpressionSet:
    if isinstance(x, ExpressionSet):
        return x
    return ExpressionSet.from_anndata(x, pert_col=pert_col, control=control,
                                      covariate_cols=tuple(covariate_cols), name=name)


def evaluate_expression(pred, ref, pert_col: str = "condition", control: str = "control",
                        covariate_cols=("cell_type",), perturbench: bool = True, vcc: bool = True,
                        n_comps: int = 100, max_cells: int | None = 2000, ranks: bool = True):
    """All metrics of this package as one tidy pandas DataFrame (columns `COLUMNS`).

    PerturBench and distribution metrics score the reference's (covariate, perturbation) groups with the
    prediction's controls replaced by the real ones. The VCC trio runs once per covariate value (the
    prediction must hold, per covariate value, the same perturbation set as the reference, control
    included), keeping the prediction's own controls for the cell-eval convention.
    """
    import numpy as np
    import pandas as pd

    p = _as_set(pred, pert_col, control, covariate_cols, "prediction")
    r = _as_set(ref, pert_col, control, covariate_cols, "reference")
    rows: list[dict] = []
    if perturbench:
        rows += perturbench_metrics(p, r, n_comps=n_comps, max_cells=max_cells, ranks=ranks)
    if vcc:
        for cov in sorted(set(r.covariate)):
            rc = r.subset(r.covariate == cov)
            if (rc.perturbation == rc.control).all():  # only controls here (e.g. a combine split's other cell
                continue                                 # type): no perturbation to score, cell-eval would fail
            rows += vcc_metrics(p.subset(p.covariate == cov), rc, covariate=cov)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["value"] = df["value"].astype(np.float64)
    return df


def summarize(table):
    """Mean, and count, of each (metric, aggregation, convention) over its perturbations and covariates."""
    g = table.groupby(["metric", "aggregation", "convention"], sort=False)["value"]
    out = g.agg(["mean", "count"]).reset_index()
    return out.rename(columns={"count": "n_perturbations"})
