"""PerturBench metrics (aggregation -> metric), with PerturBench's conventions, each named.

Before anything is scored the prediction's control cells are replaced by the reference's REAL control
cells (PerturBench does this; a model is never judged on its own controls). Groups are the reference's
(covariate, perturbation) pairs, control excluded; covariate values are joined with "_".

Aggregations (one vector per group):
- `average`: mean log1p expression.
- `logfc`: log2(mean(x_p) + 0.1) - log2(mean(x_ctrl) + 0.1) on the log1p values themselves (no expm1),
  controls of the same covariate value (categorical covariates only).
- `pca_average`: mean of the cells' PCA coordinates (PCA fit on the reference split, controls included,
  100 components capped by the data; see `distribution.fit_pca`).
- `scores`: scanpy `rank_genes_groups(method="t-test_overestim_var", reference=control)` run per covariate
  value: Welch t with the group's size used for both samples, (m_p - m_c) / sqrt((v_p + v_c) / n_p),
  variances ddof=1, NaN -> 0.
- `pca`: the cells themselves in PCA space (distribution metrics, see `distribution.py`).

Metrics: `rmse` (average), `cosine` (logfc, pca_average), `r2_score` (scores) computed as sklearn's
r2_score(pred, ref), i.e. with the PREDICTION as y_true, exactly as PerturBench calls it
(1 - sum((ref - pred)^2) / sum((pred - mean(pred))^2)), `top_k_recall` (scores, k = 50: the fraction of
the reference's top-k genes by |score| found among the prediction's top-k by |score|), and `mmd` (pca) =
geomloss energy = half the Euclidean energy distance. Infinite values are set to 0 before comparing
(PerturBench's compare_perts).

Rank metrics (`<metric>_rank`): for each reference group j, the position of prediction j among all
predictions ordered by their distance (ascending) or similarity (descending) to reference j, divided by
N - 1: 0 is best, about 0.5 random, 1 worst. PerturBench shuffles before sorting to break ties; here a tie
counts half (the expectation of that shuffle), so the value is deterministic.
"""
from __future__ import annotations

import warnings

import numpy as np

from ._data import ExpressionSet, with_real_controls
from .distribution import PCA, distribution_metrics, fit_pca

PSEUDOCOUNT = 0.1
TOP_K = 50


# ---- metrics on vectors ------------------------------------------------------------------------------
def _finite(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).copy()
    v[~np.isfinite(v)] = 0.0
    return v


def rmse(pred, ref) -> float:
    """Root mean squared error over genes (PerturBench, aggregation `average`)."""
    p, r = _finite(pred), _finite(ref)
    return float(np.sqrt(np.mean((p - r) ** 2)))


def cosine(pred, ref) -> float:
    """Cosine similarity p.r / (|p| |r|) (PerturBench, aggregations `logfc` and `pca_average`)."""
    p, r = _finite(pred), _finite(ref)
    den = np.linalg.norm(p) * np.linalg.norm(r)
    return float(p @ r / den) if den > 0 else float("nan")


def r2_score_perturbench(pred, ref) -> float:
    """sklearn r2_score(pred, ref): the PREDICTION is y_true (PerturBench's call order).

    = 1 - sum((ref - pred)^2) / sum((pred - mean(pred))^2). Not symmetric; with the usual order
    (ref as y_true) the denominator would be the reference's variance.
    """
    p, r = _finite(pred), _finite(ref)
    ss_tot = np.sum((p - p.mean()) ** 2)
    ss_res = np.sum((r - p) ** 2)
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0  # sklearn's convention for a constant y_true
    return float(1.0 - ss_res / ss_tot)


def top_k_recall(pred, ref, k: int = TOP_K) -> float:
    """|top-k genes of |ref| and top-k genes of |pred|| / k, k capped by the gene count; ties by gene order."""
    p, r = np.abs(_finite(pred)), np.abs(_finite(ref))
    k = int(min(k, len(r)))
    top_p = np.argsort(-p, kind="stable")[:k]
    top_r = np.argsort(-r, kind="stable")[:k]
    return float(len(np.intersect1d(top_p, top_r)) / k)


def rank_scores(pred_mat: np.ndarray, ref_mat: np.ndarray, fn, kind: str) -> np.ndarray:
    """Rank of prediction j for reference j among all predictions, / (N - 1); ties count half."""
    n = len(ref_mat)
    if n < 2:
        return np.full(n, np.nan)
    m = np.array([[fn(pred_mat[i], ref_mat[j]) for j in range(n)] for i in range(n)])
    out = np.empty(n)
    for j in range(n):
        col, own = m[:, j], m[j, j]
        others = np.delete(col, j)
        better = others < own if kind == "distance" else others > own
        out[j] = (better.sum() + 0.5 * (others == own).sum()) / (n - 1)
    return out


# ---- aggregations ------------------------------------------------------------------------------------
def aggregate_average(es: ExpressionSet, groups) -> np.ndarray:
    return np.stack([es.mean(p, c) for c, p in groups])


def aggregate_logfc(es: ExpressionSet, groups, pseudocount: float = PSEUDOCOUNT) -> np.ndarray:
    """log2(mean(x_p) + 0.1) - log2(mean(x_ctrl) + 0.1), x log1p, controls of the same covariate value."""
    rows = []
    for c, p in groups:
        ctrl = es.mean(es.control, c)
        rows.append(np.log2(es.mean(p, c) + pseudocount) - np.log2(ctrl + pseudocount))
    return np.stack(rows)


def aggregate_pca_average(es: ExpressionSet, groups, pca: PCA) -> np.ndarray:
    z = pca.transform(es.x)
    return np.stack([z[es.mask(p, c)].mean(axis=0) for c, p in groups])


def aggregate_scores(es: ExpressionSet, groups) -> np.ndarray:
    """scanpy rank_genes_groups t-test_overestim_var vs control, per covariate value; scores in gene order."""
    import anndata
    import pandas as pd
    import scanpy as sc

    out = {}
    for cov in sorted({c for c, _ in groups}):
        m = es.covariate == cov
        if not (m & (es.perturbation == es.control)).any():
            raise ValueError(f"{es.name}: no control cells in covariate {cov!r}")
        ad = anndata.AnnData(es.x[m].astype(np.float64))
        ad.var_names = es.genes
        ad.obs_names = [str(i) for i in range(ad.n_obs)]
        ad.obs["pert"] = pd.Categorical(es.perturbation[m])
        wanted = [p for c, p in groups if c == cov]
        with warnings.catch_warnings():  # scanpy's own pandas fragmentation warnings, one per group
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
            sc.tl.rank_genes_groups(ad, groupby="pert", groups=wanted, reference=es.control,
                                    method="t-test_overestim_var", n_genes=ad.n_vars, key_added="pb")
        gene_pos = {g: i for i, g in enumerate(es.genes)}
        for p in wanted:
            df = sc.get.rank_genes_groups_df(ad, group=p, key="pb")
            v = np.zeros(len(es.genes))
            v[[gene_pos[g] for g in df["names"]]] = df["scores"].to_numpy(dtype=np.float64)
            out[(cov, p)] = v
    return np.stack([out[g] for g in groups])


# ---- the whole PerturBench table ---------------------------------------------------------------------
def _rows(metric, aggregation, groups, values, convention):
    return [{"metric": metric, "aggregation": aggregation, "covariate": c, "perturbation": p, "value": float(v),
                 "convention": convention} for (c, p), v in zip(groups, values)]


RANK_NOTE = "rank of the true perturbation / (N - 1) over all groups; 0 best, ~0.5 random; ties count half"


def perturbench_metrics(pred: ExpressionSet, ref: ExpressionSet, n_comps: int = 100, top_k: int = TOP_K,
                        ranks: bool = True, scores: bool = True, distributions: bool = True,
                        max_cells: int | None = 2000, pca: PCA | None = None) -> list[dict]:
    """Every PerturBench (aggregation, metric) pair per (covariate, perturbation) of the reference.

    The prediction's controls are replaced by the reference's real controls first.
    """
    pred = with_real_controls(pred, ref)
    groups = ref.groups()
    if not groups:
        raise ValueError(f"{ref.name}: no perturbed (non-control) cells to score")
    missing = [g for g in groups if not pred.mask(g[1], g[0]).any()]
    if missing:
        raise ValueError(f"{pred.name}: no predicted cells for (covariate, perturbation) {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    pca = pca or fit_pca(ref.x, n_comps)
    rows: list[dict] = []
    aggs = [
        ("average", aggregate_average(pred, groups), aggregate_average(ref, groups), rmse, "distance",
         "rmse", "RMSE of mean log1p expression"),
        ("logfc", aggregate_logfc(pred, groups), aggregate_logfc(ref, groups), cosine, "similarity",
         "cosine", "cosine of log2(mean+0.1) fold changes vs covariate-matched real controls, no expm1"),
        ("pca_average", aggregate_pca_average(pred, groups, pca), aggregate_pca_average(ref, groups, pca),
         cosine, "similarity", "cosine", (f"cosine of mean PCA coordinates ({pca.components.shape[0]} PCs "
                                          "fit on the reference, controls included)")),
    ]
    for agg, pm, rm, fn, kind, name, conv in aggs:
        rows += _rows(name, agg, groups, [fn(a, b) for a, b in zip(pm, rm)], conv)
        if ranks:
            rows += _rows(f"{name}_rank", agg, groups, rank_scores(pm, rm, fn, kind), RANK_NOTE)
    if scores:
        ps, rs = aggregate_scores(pred, groups), aggregate_scores(ref, groups)
        rows += _rows("r2_score", "scores", groups, [r2_score_perturbench(a, b) for a, b in zip(ps, rs)],
                      "sklearn r2_score(pred, ref): prediction as y_true (PerturBench's order); "
                      "scanpy t-test_overestim_var scores vs control")
        rows += _rows("top_k_recall", "scores", groups, [top_k_recall(a, b, top_k) for a, b in zip(ps, rs)],
                      f"overlap of top-{min(top_k, len(ref.genes))} genes by |t-score| / k")
    if distributions:
        rows += distribution_metrics(pred, ref, pca, max_cells=max_cells)
    return rows
