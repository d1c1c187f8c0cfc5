"""Distribution-level metrics per perturbation in PCA space (they reward getting heterogeneity right).

Conventions (the same name means different numbers in different packages, so each is named here):

- `energy_distance`: plain Euclidean energy distance with V-statistics (all pairs, the zero diagonal
  included): E = 2 E|X-Y| - E|X-X'| - E|Y-Y'|. This is cell-eval's and pertpy's convention. scperturb's
  "E-distance" differs: squared Euclidean distances and U-statistics (diagonal excluded); CellFlow uses
  squared Euclidean with V-statistics. Those are not computed here.
- `geomloss_energy`: geomloss `SamplesLoss("energy")` with uniform weights = HALF the Euclidean V-statistic
  energy distance. This is the value PerturBench reports under the name "mmd" (aggregation `pca`).
- `rbf_mmd2`: squared MMD, biased V-statistic, Gaussian kernel k(x, y) = exp(-|x - y|^2 / (2 s^2)) with
  the bandwidth s = median of the pooled (prediction + reference) pairwise Euclidean distances, off-diagonal
  pairs only (the median heuristic), unless `bandwidth` is given.

PCA (`fit_pca`) is fit on the reference split, controls included, centred on the reference mean, by an
exact SVD (scanpy's `sc.tl.pca` spans the same subspace; component signs may differ, which no distance here
sees). Default 100 components, capped at min(n_cells - 1, n_genes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist


@dataclass
class PCA:
    mean: np.ndarray
    components: np.ndarray  # (n_comps, n_genes)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def fit_pca(x_ref: np.ndarray, n_comps: int = 100) -> PCA:
    """PCA fit on the reference cells (controls included), n_comps capped by min(n_cells - 1, n_genes)."""
    x = np.asarray(x_ref, dtype=np.float64)
    k = int(min(n_comps, x.shape[0] - 1, x.shape[1]))
    if k < 1:
        raise ValueError(f"PCA needs at least 2 reference cells, got {x.shape[0]}")
    mu = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return PCA(mu, vt[:k])


def _mean_dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(cdist(a, b, metric="euclidean").mean())


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Euclidean energy distance, V-statistics: 2 E|X-Y| - E|X-X'| - E|Y-Y'| (0 iff same samples' law).

    cell-eval/pertpy convention; NOT scperturb's (squared distances, U-statistics).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return 2.0 * _mean_dist(x, y) - _mean_dist(x, x) - _mean_dist(y, y)


def geomloss_energy(x: np.ndarray, y: np.ndarray) -> float:
    """geomloss SamplesLoss("energy") with uniform weights = energy_distance / 2 (PerturBench's "mmd")."""
    return 0.5 * energy_distance(x, y)


def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """Median heuristic: median Euclidean distance over distinct pairs of the pooled sample."""
    z = np.vstack([x, y]).astype(np.float64)
    d = cdist(z, z)
    off = d[np.triu_indices(len(z), k=1)]
    s = float(np.median(off)) if off.size else 0.0
    return s if s > 0 else 1.0


def rbf_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Squared MMD (biased V-statistic) with a Gaussian kernel exp(-d^2 / (2 s^2)).

    s = `bandwidth`, or the median of pooled pairwise Euclidean distances (`median_bandwidth`). In [0, 2].
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    s = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)

    def k(a, b):
        return np.exp(-cdist(a, b, "sqeuclidean") / (2.0 * s * s)).mean()

    return float(k(x, x) + k(y, y) - 2.0 * k(x, y))


def _subsample(x: np.ndarray, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_cells is None or len(x) <= max_cells:
        return x
    return x[np.sort(rng.choice(len(x), size=max_cells, replace=False))]


def distribution_metrics(pred, ref, pca: PCA, max_cells: int | None = 2000, seed: int = 0) -> list[dict]:
    """Per (covariate, perturbation) group of the reference: the three distances above, in PCA space.

    Groups larger than `max_cells` are subsampled without replacement (seeded) to keep the O(n^2) cost
    bounded; `max_cells=None` uses every cell. Rows are tidy dicts (see `evaluate_expression`).
    """
    rng = np.random.default_rng(seed)
    zp_all = pca.transform(pred.x)
    zr_all = pca.transform(ref.x)
    rows = []
    for cov, pert in ref.groups():
        mp, mr = pred.mask(pert, cov), ref.mask(pert, cov)
        if not mp.any():
            raise ValueError(f"{pred.name}: no predicted cells for {pert!r} in covariate {cov!r}")
        zp = _subsample(zp_all[mp], max_cells, rng)
        zr = _subsample(zr_all[mr], max_cells, rng)
        e = energy_distance(zp, zr)
        s = median_bandwidth(zp, zr)
        for metric, value, conv in (
            ("energy_distance", e, "Euclidean energy distance, V-statistics (cell-eval/pertpy)"),
            ("mmd", 0.5 * e, ("PerturBench 'mmd' = geomloss SamplesLoss('energy') = half the Euclidean "
                             "V-statistic energy distance")),
            ("rbf_mmd2", rbf_mmd2(zp, zr, s), ("squared MMD, biased V-statistic, Gaussian kernel, bandwidth = "
                                              "median pooled pairwise distance")),
        ):
            rows.append({"metric": metric, "aggregation": "pca", "covariate": cov, "perturbation": pert,
                             "value": float(value), "convention": conv})
    return rows
