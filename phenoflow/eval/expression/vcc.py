"""Virtual Cell Challenge metrics: cell-eval 0.8.2's `vcc` profile, recomputed with NumPy/SciPy.

Groups are perturbation labels only (cell-eval ignores covariates; `evaluate_expression` runs this once
per covariate value, as one cell-eval run per cell line would). Both splits must hold the same genes in the
same order and the same perturbation set, control included (cell-eval refuses otherwise; so does this).
Input must be log1p expression (cell-eval would silently normalise integer data; here it is an error).

- `mae`: per perturbation, mean over genes of |pseudobulk_pred - pseudobulk_real| on the MEANS, not on
  deltas; no control cells are involved.
- `discrimination_score_l1` (PDS): signed pseudobulk deltas (perturbation mean - control mean). The real
  delta always uses the real file's controls. For perturbation p, L1 distances from the predicted delta of
  p to every real delta, over all genes except the column whose name equals the label p (a combination
  label such as "A+B" matches no gene, so nothing is excluded: cell-eval's rule). score = 1 - rank / N,
  rank = position of p in `np.argsort` of the distances (0-based, ties not broken beyond argsort's order),
  N = number of perturbations: 1 best, a constant prediction scores about 0.5.
- `overlap_at_N`: DE of each perturbation against control cells: two-sided Mann-Whitney U (asymptotic,
  tie-corrected, continuity-corrected; p = 1 when all values are equal), Benjamini-Hochberg FDR over the
  genes of that perturbation, significant when float32(FDR) < 0.05; log2FC = log2(expm1(mean x_p) /
  expm1(mean x_ctrl)) (0/0 -> 0). Significant genes are ranked by |log2FC| (descending, ties in gene
  order); k = number of real significant genes; score = |real top-k  &  predicted top-k| / k (0 when the
  reference has none, and for every perturbation when either file has no significant gene at all).

Control cells ("which controls"), the known pitfall: cell-eval computes the PREDICTED deltas and the
predicted DE against the PREDICTION FILE'S OWN control cells (`convention="cell-eval"`), so a model's
predicted controls move PDS and DE overlap (not MAE). `convention="real_controls"` uses the real control
cells for the prediction too. When the prediction file carries the real controls (as phenoflow writes it),
both agree.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from ._data import ExpressionSet, check_log1p, check_pair

FDR = 0.05
CONVENTIONS = {
    "cell-eval": "cell-eval vcc profile: prediction's deltas/DE vs the PREDICTION file's own control cells",
    "real_controls": "prediction's deltas/DE vs the REAL control cells",
}


def _perts(pred: ExpressionSet, ref: ExpressionSet) -> np.ndarray:
    check_pair(pred, ref)
    pr, rr = np.unique(pred.perturbation), np.unique(ref.perturbation)
    if not np.array_equal(pr, rr):
        only_p = sorted(set(pr) - set(rr))[:5]
        only_r = sorted(set(rr) - set(pr))[:5]
        raise ValueError(f"perturbation sets differ: only in {pred.name}: {only_p}; only in {ref.name}: {only_r}")
    if ref.control not in pr:
        raise ValueError(f"{pred.name}: no control cells labelled {ref.control!r} (cell-eval needs them)")
    for es in (pred, ref):
        check_log1p(es.x, es.name)
    return np.array([p for p in rr if p != ref.control])


def pseudobulk(es: ExpressionSet, labels) -> np.ndarray:
    if len(labels) == 0:
        return np.zeros((0, es.x.shape[1]), np.float64)
    return np.stack([es.x[es.perturbation == p].mean(axis=0) for p in labels])


def mae(pred: ExpressionSet, ref: ExpressionSet) -> dict[str, float]:
    """Per perturbation: mean |pred mean - real mean| over genes (pseudobulk means, not deltas)."""
    perts = _perts(pred, ref)
    d = np.abs(pseudobulk(pred, perts) - pseudobulk(ref, perts)).mean(axis=1)
    return dict(zip(perts.tolist(), d.tolist()))


def _pred_controls(pred: ExpressionSet, ref: ExpressionSet, convention: str) -> np.ndarray:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    src = pred if convention == "cell-eval" else ref
    return src.x[src.perturbation == src.control]


def discrimination_score_l1(pred: ExpressionSet, ref: ExpressionSet, convention: str = "cell-eval"):
    """PDS (see module docstring): 1 - rank / N of the true perturbation by L1 distance of signed deltas."""
    perts = _perts(pred, ref)
    real_eff = pseudobulk(ref, perts) - ref.x[ref.perturbation == ref.control].mean(axis=0)
    pred_eff = pseudobulk(pred, perts) - _pred_controls(pred, ref, convention).mean(axis=0)
    n = len(perts)
    out = {}
    for i, p in enumerate(perts):
        keep = ref.genes != p
        dist = np.abs(real_eff[:, keep] - pred_eff[i, keep]).sum(axis=1)
        rank = int(np.flatnonzero(np.argsort(dist) == i)[0])
        out[str(p)] = 1.0 - rank / n
    return out


def mann_whitney_p(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two-sided asymptotic Mann-Whitney U p-value per gene (tie and continuity corrected); 1 if constant."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = stats.mannwhitneyu(x, y, axis=0, method="asymptotic", use_continuity=True,
                               alternative="two-sided").pvalue
    z = np.vstack([x, y])
    const = np.all(z == z[:1], axis=0)
    p = np.where(const | np.isnan(p), 1.0, p)
    return np.clip(p, 0.0, 1.0)


def de_table(x_pert: np.ndarray, x_ctrl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log2FC, BH FDR) per gene of perturbed cells against control cells (see module docstring)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(np.expm1(x_pert.mean(axis=0)) / np.expm1(x_ctrl.mean(axis=0)))
    lfc[np.isnan(lfc)] = 0.0
    fdr = stats.false_discovery_control(mann_whitney_p(x_pert, x_ctrl))
    return lfc, fdr


def _top_sig(lfc: np.ndarray, fdr: np.ndarray, fdr_threshold: float) -> np.ndarray:
    sig = np.flatnonzero(fdr.astype(np.float32) < fdr_threshold)
    key = np.abs(lfc[sig]).astype(np.float32)
    return sig[np.argsort(-key, kind="stable")]


def overlap_at_n(pred: ExpressionSet, ref: ExpressionSet, convention: str = "cell-eval",
                 fdr_threshold: float = FDR) -> dict[str, float]:
    """DE-gene overlap at N = number of real significant genes (see module docstring)."""
    perts = _perts(pred, ref)
    real_ctrl = ref.x[ref.perturbation == ref.control]
    pred_ctrl = _pred_controls(pred, ref, convention)
    real_top, pred_top = {}, {}
    for p in perts:
        real_top[p] = _top_sig(*de_table(ref.x[ref.perturbation == p], real_ctrl), fdr_threshold)
        pred_top[p] = _top_sig(*de_table(pred.x[pred.perturbation == p], pred_ctrl), fdr_threshold)
    if not any(len(v) for v in real_top.values()) or not any(len(v) for v in pred_top.values()):
        return {str(p): 0.0 for p in perts}
    out = {}
    for p in perts:
        k = len(real_top[p])
        out[str(p)] = len(np.intersect1d(real_top[p][:k], pred_top[p][:k])) / k if k else 0.0
    return out


def vcc_metrics(pred: ExpressionSet, ref: ExpressionSet, covariate: str = "") -> list[dict]:
    """Tidy rows of the vcc trio; PDS and DE overlap under both control conventions."""
    rows = [{"metric": "mae", "aggregation": "pseudobulk", "covariate": covariate, "perturbation": p, "value": v,
                 "convention": "cell-eval vcc: MAE of pseudobulk means (not deltas); controls not involved"}
            for p, v in mae(pred, ref).items()]
    for conv, note in CONVENTIONS.items():
        for metric, fn in (("discrimination_score_l1", discrimination_score_l1), ("overlap_at_N", overlap_at_n)):
            rows += [{"metric": metric, "aggregation": f"vcc:{conv}", "covariate": covariate, "perturbation": p,
                          "value": v, "convention": note} for p, v in fn(pred, ref, convention=conv).items()]
    return rows
