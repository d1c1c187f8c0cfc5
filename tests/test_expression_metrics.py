"""Expression metrics (phenoflow.eval.expression) against direct NumPy/SciPy computations and cell-eval."""
from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import stats

from phenoflow.eval.expression import (
    ExpressionSet,
    check_log1p,
    cosine,
    discrimination_score_l1,
    energy_distance,
    evaluate_expression,
    fit_pca,
    geomloss_energy,
    mae,
    overlap_at_n,
    perturbench_metrics,
    r2_score_perturbench,
    rank_scores,
    rbf_mmd2,
    rmse,
    summarize,
    top_k_recall,
)
from phenoflow.eval.expression.perturbench import aggregate_logfc, aggregate_scores
from phenoflow.eval.expression.vcc import de_table

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "perturbench_devel.h5ad")


def make_set(seed=0, n_perts=6, n_genes=30, n_cells=40, n_ctrl=60, covs=("", ), ctrl_shift=0.0, name="ref",
             gene_names=None):
    """log1p(Poisson) cells; perturbation i raises genes 2i, 2i+1 and lowers gene 2i+2 (known DE genes)."""
    rng = np.random.default_rng(seed)
    xs, ps, cs = [], [], []
    base = rng.uniform(0.5, 4.0, n_genes)
    for ci, cov in enumerate(covs):
        lam = base * (1.0 + 0.3 * ci)
        xs.append(np.log1p(rng.poisson(lam, (n_ctrl, n_genes))) + ctrl_shift)
        ps += ["control"] * n_ctrl
        cs += [cov] * n_ctrl
        for i in range(n_perts):
            lp = lam.copy()
            lp[[2 * i % n_genes, (2 * i + 1) % n_genes]] *= 4.0
            lp[(2 * i + 2) % n_genes] *= 0.1
            xs.append(np.log1p(rng.poisson(lp, (n_cells, n_genes))))
            ps += [f"P{i}"] * n_cells
            cs += [cov] * n_cells
    genes = gene_names if gene_names is not None else [f"g{j}" for j in range(n_genes)]
    return ExpressionSet.from_arrays(np.vstack(xs), ps, cs, genes, name=name)


# ---- vector metrics ----------------------------------------------------------------------------------
def test_vector_metrics_known_answers():
    p, r = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0])
    assert rmse(p, r) == pytest.approx(1.0)  # sqrt(4 / 4)
    assert cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert cosine([1, 1], [2, 2]) == pytest.approx(1.0)
    assert cosine([1, 2], [-1, -2]) == pytest.approx(-1.0)
    # prediction as y_true: 1 - 4 / 5; with the reference as y_true it would be 1 - 4 / 14
    assert r2_score_perturbench(p, r) == pytest.approx(1 - 4 / 5)
    assert r2_score_perturbench(r, p) == pytest.approx(1 - 4 / 14)
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert r2_score_perturbench(a, b) == pytest.approx(r2_score(a, b), abs=1e-12)
    # top-k recall on |scores|: reference top-2 = {3, 0}; prediction top-2 = {3, 1}
    assert top_k_recall([0.1, 5.0, 0.2, -9.0], [-4.0, 0.5, 0.3, 8.0], k=2) == pytest.approx(0.5)
    assert top_k_recall(np.arange(100.0), np.arange(100.0)) == 1.0  # k = 50 default
    assert top_k_recall(np.arange(100.0), -np.arange(100.0)[::-1]) == 0.0  # |.| reverses the order


def test_rank_scores_best_worst_random():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 10))
    assert np.all(rank_scores(ref, ref, rmse, "distance") == 0.0)
    # a prediction that is the negative of each reference is the farthest under cosine: rank 1 (worst)
    assert np.all(rank_scores(-ref, ref, cosine, "similarity") == 1.0)
    shuffled = [rank_scores(ref[rng.permutation(20)], ref, rmse, "distance").mean() for _ in range(30)]
    assert 0.4 < np.mean(shuffled) < 0.6
    # identical predictions for everything: every position ties -> exactly 0.5
    assert np.allclose(rank_scores(np.ones((5, 10)), ref[:5], rmse, "distance"), 0.5)


# ---- distribution metrics ----------------------------------------------------------------------------
def test_energy_distance_against_direct_and_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.7, 1.3, size=(25, 4))
    d = lambda a, b: np.mean([np.linalg.norm(u - v) for u in a for v in b])
    direct = 2 * d(x, y) - d(x, x) - d(y, y)
    assert energy_distance(x, y) == pytest.approx(direct, rel=1e-10)
    assert geomloss_energy(x, y) == pytest.approx(direct / 2, rel=1e-10)
    # 1-D: scipy.stats.energy_distance is the square root of the same V-statistic
    assert energy_distance(x[:, :1], y[:, :1]) == pytest.approx(stats.energy_distance(x[:, 0], y[:, 0]) ** 2)
    assert energy_distance(np.zeros((1, 1)), np.ones((1, 1))) == pytest.approx(2.0)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


def test_rbf_mmd_against_direct():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 3)), rng.normal(1.0, 1.0, size=(9, 3))
    z = np.vstack([x, y])
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    s = np.median(dists)
    k = lambda a, b: np.mean([np.exp(-np.sum((u - v) ** 2) / (2 * s * s)) for u in a for v in b])
    assert rbf_mmd2(x, y) == pytest.approx(k(x, x) + k(y, y) - 2 * k(x, y), rel=1e-10)
    assert rbf_mmd2(x, x) == pytest.approx(0.0, abs=1e-12)
    assert rbf_mmd2(x, y, bandwidth=1.0) != pytest.approx(rbf_mmd2(x, y))


def test_pca_fit_on_reference_and_capped():
    ref = make_set()
    pca = fit_pca(ref.x, 100)
    assert pca.components.shape == (30, 30)  # capped by 30 genes
    assert fit_pca(ref.x[:8], 100).components.shape[0] == 7  # capped by n_cells - 1
    z = pca.transform(ref.x)
    assert np.allclose(z @ pca.components + pca.mean, ref.x)  # full rank: exact reconstruction
    assert np.allclose(z.mean(axis=0), 0.0, atol=1e-10)  # centred on the reference


# ---- PerturBench aggregations ------------------------------------------------------------------------
def test_logfc_uses_covariate_matched_controls_without_expm1():
    es = make_set(covs=("A", "B"))
    groups = es.groups()
    lfc = aggregate_logfc(es, groups)
    for (c, p), row in zip(groups, lfc):
        mp = es.x[(es.perturbation == p) & (es.covariate == c)].mean(0)
        mc = es.x[(es.perturbation == "control") & (es.covariate == c)].mean(0)
        assert np.allclose(row, np.log2(mp + 0.1) - np.log2(mc + 0.1))
    assert lfc[groups.index(("A", "P0")), 0] > 0.5  # P0 raises gene 0


def test_scores_are_scanpy_t_test_overestim_var():
    es = make_set(n_perts=3, covs=("A", "B"))
    groups = es.groups()
    got = aggregate_scores(es, groups)
    for (c, p), row in zip(groups, got):
        a = es.x[(es.perturbation == p) & (es.covariate == c)]
        b = es.x[(es.perturbation == "control") & (es.covariate == c)]
        t = (a.mean(0) - b.mean(0)) / np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / len(a))
        assert np.allclose(row, np.nan_to_num(t), rtol=1e-5, atol=1e-5)


def test_perturbench_identical_is_best_and_controls_are_replaced():
    ref = make_set(covs=("A", "B"))
    rows = perturbench_metrics(ref, ref, max_cells=None)
    best = {"rmse": 0.0, "cosine": 1.0, "r2_score": 1.0, "top_k_recall": 1.0, "mmd": 0.0,
            "energy_distance": 0.0, "rbf_mmd2": 0.0, "rmse_rank": 0.0, "cosine_rank": 0.0}
    seen = set()
    for r in rows:
        assert r["value"] == pytest.approx(best[r["metric"]], abs=1e-9), r
        seen.add((r["metric"], r["aggregation"]))
    assert ("cosine", "pca_average") in seen and ("mmd", "pca") in seen and ("top_k_recall", "scores") in seen
    # a prediction whose controls are garbage scores exactly as one with the real controls
    pred = make_set(seed=5, covs=("A", "B"), name="pred")
    bad = make_set(seed=5, covs=("A", "B"), ctrl_shift=3.0, name="pred")
    v1 = [r["value"] for r in perturbench_metrics(pred, ref)]
    v2 = [r["value"] for r in perturbench_metrics(bad, ref)]
    assert np.allclose(v1, v2)
    shuffled = make_set(seed=5, covs=("A", "B"), name="pred")
    shuffled.perturbation = np.random.default_rng(0).permutation(shuffled.perturbation)
    shuffled.perturbation[bad.perturbation == "control"] = "control"
    sh = [r for r in perturbench_metrics(shuffled, ref, scores=False) if r["metric"] == "rmse_rank"]
    assert np.mean([r["value"] for r in sh]) > 0.3  # near the ~0.5 random level, far from 0


# ---- VCC ---------------------------------------------------------------------------------------------
def test_vcc_direct_and_extremes():
    ref = make_set(gene_names=[f"P{j}" if j < 6 else f"g{j}" for j in range(30)])
    pred = make_set(seed=3, gene_names=list(ref.genes), name="pred")
    m = mae(pred, ref)
    for p in m:
        d = np.abs(pred.x[pred.perturbation == p].mean(0) - ref.x[ref.perturbation == p].mean(0)).mean()
        assert m[p] == pytest.approx(d)
    assert all(v == 0 for v in mae(ref, ref).values())
    assert all(v == 1.0 for v in discrimination_score_l1(ref, ref).values())
    # direct PDS for P1: L1 over genes except column "P1"
    eff = lambda es, p: es.x[es.perturbation == p].mean(0) - es.x[es.perturbation == "control"].mean(0)
    perts = [f"P{i}" for i in range(6)]
    keep = ref.genes != "P1"
    dist = [np.abs(eff(ref, q)[keep] - eff(pred, "P1")[keep]).sum() for q in perts]
    assert discrimination_score_l1(pred, ref)["P1"] == 1 - int(np.argsort(dist).tolist().index(1)) / 6
    # a constant prediction (control for every perturbation) sits near 0.5, never at the top
    const = ExpressionSet.from_arrays(np.vstack([ref.x[ref.perturbation == "control"]] * 2),
                                      ["control"] * 60 + [f"P{i}" for i in range(6) for _ in range(10)],
                                      genes=ref.genes, name="const")
    assert 0.1 < np.mean(list(discrimination_score_l1(const, ref).values())) < 0.9
    assert all(v == 1.0 for v in overlap_at_n(ref, ref).values())


def test_de_table_against_scipy():
    ref = make_set()
    a, c = ref.x[ref.perturbation == "P2"], ref.x[ref.perturbation == "control"]
    lfc, fdr = de_table(a, c)
    p = np.array([stats.mannwhitneyu(a[:, j], c[:, j], method="asymptotic").pvalue for j in range(30)])
    assert np.allclose(fdr, stats.false_discovery_control(p))
    assert np.allclose(lfc, np.log2(np.expm1(a.mean(0)) / np.expm1(c.mean(0))))
    assert set(np.flatnonzero(fdr < 0.05)) >= {4, 5, 6}  # the genes P2 moves


def test_vcc_control_conventions_differ_only_with_fake_controls():
    ref = make_set()
    shifted = make_set(seed=0, ctrl_shift=0.5, name="pred")  # real perturbed cells, fake controls
    assert all(v == 0 for k, v in mae(shifted, ref).items())  # MAE never looks at controls
    assert all(v == 1.0 for v in discrimination_score_l1(shifted, ref, convention="real_controls").values())
    assert all(v == 1.0 for v in overlap_at_n(shifted, ref, convention="real_controls").values())
    assert min(overlap_at_n(shifted, ref, convention="cell-eval").values()) < 1.0


def test_bad_inputs_named():
    ref = make_set()
    with pytest.raises(ValueError, match="integers"):
        check_log1p(np.array([[0.0, 3.0], [2.0, 5.0]]), "counts.h5ad")
    with pytest.raises(ValueError, match=">= 15"):
        check_log1p(np.array([[0.5, 30.5]]), "big")
    fewer = ref.subset(ref.perturbation != "P3")
    with pytest.raises(ValueError, match="perturbation sets differ"):
        mae(fewer, ref)
    other_genes = ExpressionSet.from_arrays(ref.x, ref.perturbation, genes=[f"h{j}" for j in range(30)])
    with pytest.raises(ValueError, match="same genes"):
        mae(other_genes, ref)


def test_table_and_summary():
    ref = make_set(covs=("A", "B"))
    pred = make_set(seed=7, covs=("A", "B"), name="pred")
    tab = evaluate_expression(pred, ref)
    assert list(tab.columns) == ["metric", "aggregation", "covariate", "perturbation", "value", "convention"]
    s = summarize(tab)
    assert {"mae", "discrimination_score_l1", "overlap_at_N", "rmse", "mmd", "rbf_mmd2"} <= set(s.metric)
    assert set(s.aggregation) >= {"vcc:cell-eval", "vcc:real_controls", "average", "logfc", "scores", "pca"}
    row = s[(s.metric == "rmse") & (s.aggregation == "average")]
    assert int(row.n_perturbations.iloc[0]) == 12  # 6 perturbations x 2 cell types
    assert tab["value"].notna().all()


# ---- cell-eval itself as the reference ----------------------------------------------------------------
def _write_pair(tmp_path, ref: ExpressionSet, pred: ExpressionSet, dtype):
    import anndata
    import pandas as pd

    paths = []
    for es, name in ((ref, "real"), (pred, "pred")):
        ad = anndata.AnnData(es.x.astype(dtype), obs=pd.DataFrame({"condition": es.perturbation},
                                                                 index=[f"c{i}" for i in range(len(es.x))]))
        ad.var_names = es.genes
        path = str(tmp_path / f"{name}.h5ad")
        ad.write_h5ad(path)
        paths.append(path)
    return paths


def _cell_eval(real_path, pred_path, tmp_path):
    cell_eval = pytest.importorskip("cell_eval", reason="cell-eval==0.8.2 not installed (pip extra 'vcc')")
    ev = cell_eval.MetricsEvaluator(adata_pred=pred_path, adata_real=real_path, control_pert="control",
                                    pert_col="condition", num_threads=1, outdir=str(tmp_path / "ce"))
    res, _ = ev.compute(profile="vcc", write_csv=False)
    return {r["perturbation"]: r for r in res.to_dicts()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vcc_trio_matches_cell_eval(tmp_path, dtype):
    genes = [f"P{j}" if j < 6 else f"g{j}" for j in range(30)]
    ref = make_set(gene_names=genes)
    pred = make_set(seed=11, ctrl_shift=0.2, gene_names=genes, name="pred")  # own, shifted controls
    real_path, pred_path = _write_pair(tmp_path, ref, pred, dtype)
    ce = _cell_eval(real_path, pred_path, tmp_path)
    r = ExpressionSet.from_anndata(real_path, covariate_cols=())
    p = ExpressionSet.from_anndata(pred_path, covariate_cols=())
    ours = {"mae": mae(p, r), "discrimination_score_l1": discrimination_score_l1(p, r),
            "overlap_at_N": overlap_at_n(p, r)}
    assert set(ce) == set(ours["mae"])
    for metric, vals in ours.items():
        for pert, v in vals.items():
            assert v == pytest.approx(ce[pert][metric], abs=1e-6), (metric, pert)
    assert max(ours["overlap_at_N"].values()) > 0  # the comparison exercised real DE genes


@pytest.mark.skipif(not os.path.exists(FIXTURE), reason="tests/data/perturbench_devel.h5ad not present")
def test_vcc_trio_matches_cell_eval_on_real_fixture(tmp_path):
    import anndata

    ad = anndata.read_h5ad(FIXTURE)
    ad = ad[ad.obs["cell_type"] == "A172"].copy()
    ref = ExpressionSet.from_anndata(ad, covariate_cols=())
    rng = np.random.default_rng(0)
    pred = ExpressionSet.from_arrays(ref.x + rng.normal(0, 0.05, ref.x.shape).clip(0) * (ref.x > 0),
                                     rng.permutation(ref.perturbation), genes=ref.genes, name="pred")
    real_path, pred_path = _write_pair(tmp_path, ref, pred, np.float32)
    ce = _cell_eval(real_path, pred_path, tmp_path)
    r = ExpressionSet.from_anndata(real_path, covariate_cols=())
    p = ExpressionSet.from_anndata(pred_path, covariate_cols=())
    for metric, fn in (("mae", mae), ("discrimination_score_l1", discrimination_score_l1),
                       ("overlap_at_N", overlap_at_n)):
        for pert, v in fn(p, r).items():
            assert v == pytest.approx(ce[pert][metric], abs=1e-6), (metric, pert)
