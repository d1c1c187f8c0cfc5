"""Synthetic single-cell counts: determinism, PerturBench conventions, and every documented effect measured back."""
import json
import math

import numpy as np
import pytest

pytest.importorskip("anndata")

from phenoflow.data.synthetic_counts import (
    BLOCK,
    CountSpec,
    generate_counts,
    plan_dataset,
    read_truth,
    synthetic_atlas,
    write_h5ad,
)
from phenoflow.data.synthetic_counts_effects import (
    COMBOS,
    DOSES,
    PENETRANCE,
    SYNERGY_LOG2FC,
    catalogue,
    effects_markdown,
)

SPEC = CountSpec(n_genes=600, n_programs=16, program_size=15, seed=7)
CELLS_PER_SLOT = 300  # per (slot, cell type)


@pytest.fixture(scope="module")
def adata():
    return generate_counts(SPEC, 20 * 2 * CELLS_PER_SLOT)  # 20 slots x 2 cell types


@pytest.fixture(scope="module")
def truth(adata):
    return read_truth(adata)


def _dense(a, cells, genes=None):
    m = a.layers["counts"][np.flatnonzero(cells)]
    return np.asarray((m if genes is None else m[:, genes]).todense(), dtype=np.float64)


def _mean_norm(a, cells, genes):
    """Mean over cells of (summed counts of `genes`) / true size factor."""
    x = _dense(a, cells, genes).sum(1) / a.obs["true_size_factor"].to_numpy()[cells]
    return x.mean()


def _sel(a, condition, cell_type=None, dose=None):
    m = (a.obs["condition"] == condition).to_numpy()
    if cell_type is not None:
        m &= (a.obs["cell_type"] == cell_type).to_numpy()
    if dose is not None:
        m &= np.isclose(a.obs["dose"].to_numpy(), dose)
    return m


def _measured(a, truth, condition, cell_type, dose, feature, with_se=False):
    """log2 ratio of size-factor-normalised means (condition over control), and its delta-method standard error."""
    idx = a.var_names.get_indexer(truth["programs"].get(feature, [feature]))
    sf = a.obs["true_size_factor"].to_numpy()
    xs = [_dense(a, m, idx).sum(1) / sf[m] for m in (_sel(a, condition, cell_type, dose), _sel(a, "control", cell_type))]
    lfc = math.log2(xs[0].mean() / xs[1].mean())
    se = math.sqrt(sum(x.var() / (x.size * x.mean() ** 2) for x in xs)) / math.log(2)
    return (lfc, se) if with_se else lfc


def _score(a, truth, program, cells):
    """Per-cell log2(1 + program counts / size factor)."""
    idx = a.var_names.get_indexer(truth["programs"][program])
    return np.log2(1 + _dense(a, cells, idx).sum(1) / a.obs["true_size_factor"].to_numpy()[cells])


def test_deterministic_and_independent_of_cell_count():
    a = generate_counts(SPEC, BLOCK + 300)
    b = generate_counts(SPEC, BLOCK + 300)
    assert (a.layers["counts"] != b.layers["counts"]).nnz == 0 and a.obs.equals(b.obs)
    short = generate_counts(SPEC, 500)  # a prefix inside the first block
    assert (short.layers["counts"] != a.layers["counts"][:500]).nnz == 0
    assert np.array_equal(short.obs["true_size_factor"], a.obs["true_size_factor"][:500])
    longer = generate_counts(SPEC, 2 * BLOCK + 5)  # the same cells across a block boundary
    assert (longer.layers["counts"][:BLOCK + 300] != a.layers["counts"]).nnz == 0
    other_seed = generate_counts(CountSpec(n_genes=600, n_programs=16, program_size=15, seed=8), 500)
    other_name = generate_counts(SPEC, 500, dataset="other")
    for o in (other_seed, other_name):
        assert (o.layers["counts"] != short.layers["counts"]).nnz > 1000


def test_perturbench_conventions(adata, truth, tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    sc = pytest.importorskip("scanpy")

    cat = catalogue(SPEC)
    counts = adata.layers["counts"]
    assert sp.isspmatrix_csr(counts) and sp.isspmatrix_csr(adata.X)
    assert counts.dtype == np.float32 and adata.X.dtype == np.float32
    assert np.array_equal(counts.data, np.round(counts.data)) and counts.data.min() > 0
    ref = ad.AnnData(counts.copy())
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    assert abs(ref.X - adata.X).max() < 1e-5
    assert "log1p" in adata.uns and "normalize_total" in truth["X"]
    obs = adata.obs
    assert {"condition", "cell_type", "dose", "dataset", "perturbation_type"} <= set(obs.columns)
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    conds = set(obs["condition"].astype(str))
    assert conds == set(cat) | {"control"} and conds == set(truth["conditions"])
    assert {c for c in conds if "+" in c} == {c for c, e in cat.items() if e["type"] == "combination"}
    ptype = dict(zip(obs["condition"].astype(str), obs["perturbation_type"].astype(str)))
    assert ptype["control"] == "control" and all(ptype[c] == e["type"] for c, e in cat.items())
    for c, e in cat.items():
        if e["type"] in ("CRISPRi", "CRISPRa"):
            assert c in adata.var_names and e["target_genes"] == {c: -3.0 if e["type"] == "CRISPRi" else 2.0}
    comp = obs["perturbation_type"] == "compound"
    assert set(obs.loc[comp, "dose"]) == set(DOSES) and (obs.loc[~comp, "dose"] == 0.0).all()
    assert set(obs["dataset"]) == {"synthetic"} and set(obs["cell_type"]) == {"K562", "RPE1"}
    assert (obs.loc[obs["condition"] == "control", "true_responder"] == False).all()
    json.dumps(truth)
    path = write_h5ad(adata, tmp_path / "sub" / "s.h5ad")
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.h5ad"]  # no temporary left behind
    back = ad.read_h5ad(path)
    assert read_truth(back) == truth
    assert (back.layers["counts"] != counts).nnz == 0 and back.obs["condition"].equals(obs["condition"])


def test_every_expected_fold_change_is_measured_back(adata, truth):
    worst, n = (0.0, None), 0
    for cond, e in truth["effects"].items():
        for ct, per_dose in e["expected_log2fc"].items():
            for dose, feats in per_dose.items():
                for f, want in feats.items():
                    got, se = _measured(adata, truth, cond, ct, float(dose), f, with_se=True)
                    n += 1
                    assert se < 0.2, (cond, ct, dose, f, se)  # power to see errors of 0.8 log2 and more
                    z = abs(got - want) / se
                    if z > worst[0]:
                        worst = (z, (cond, ct, dose, f, got, want, se))
    assert n > 60
    assert worst[0] < 4.0, worst  # within 4 standard errors, every one of the n comparisons


def test_target_gene_knockdown_and_activation_visible(adata):
    for c, e in catalogue(SPEC).items():
        if e["type"] not in ("CRISPRi", "CRISPRa"):
            continue
        g = adata.var_names.get_loc(c)
        pert = adata.X[np.flatnonzero(_sel(adata, c)), g].mean()
        ctrl = adata.X[np.flatnonzero(_sel(adata, "control")), g].mean()
        raw = 2 ** _measured(adata, {"programs": {}}, c, None, None, c)
        if e["type"] == "CRISPRi":
            assert raw < 0.2 and pert < ctrl - 0.3, (c, raw)
        elif e["response"] != "bimodal":
            assert raw > 3.0 and pert > ctrl + 0.3, (c, raw)
        else:
            assert 1.3 < raw < 2.8, (c, raw)  # 0.6 + 0.4 * 4 = 2.2


def _two_means(x, iters=50):
    lo, hi = np.percentile(x, [10, 90])
    for _ in range(iters):
        high = np.abs(x - hi) < np.abs(x - lo)
        lo, hi = x[~high].mean(), x[high].mean()
    return high, lo, hi


def test_bimodal_responder_fraction_recovered(adata, truth):
    cat = catalogue(SPEC)
    bimodal = [c for c, e in cat.items() if e.get("response") == "bimodal"]
    assert bimodal
    for c in bimodal:
        (prog,) = cat[c]["programs"]
        cells = _sel(adata, c, "K562")
        high, lo, hi = _two_means(_score(adata, truth, prog, cells))
        ctrl_scores = _score(adata, truth, prog, _sel(adata, "control", "K562"))
        ctrl = ctrl_scores.mean()
        truly = adata.obs["true_responder"].to_numpy()[cells]
        assert abs(truly.mean() - PENETRANCE) < 4 * math.sqrt(PENETRANCE * (1 - PENETRANCE) / truly.size)
        assert abs(high.mean() - truly.mean()) < 0.05, (c, high.mean(), truly.mean())
        assert abs(lo - ctrl) < 0.25 and hi - lo > 1.0, (c, lo, hi, ctrl)
        assert (high == truly).mean() > 0.9
        below = (_score(adata, truth, prog, cells) <= np.median(ctrl_scores)).mean()
        assert below > 0.5 * (1 - PENETRANCE) - 0.08, (c, below)  # the non-responders sit on the controls
    # A uniform responder has no control-like subpopulation: few cells below the control median.
    for c, e in cat.items():
        if e.get("response") == "uniform" and e["type"] != "compound":
            (prog,) = e["programs"]
            ctrl_scores = _score(adata, truth, prog, _sel(adata, "control", "K562"))
            below = (_score(adata, truth, prog, _sel(adata, c, "K562")) <= np.median(ctrl_scores)).mean()
            assert below < 0.15, (c, below)


def test_variance_changes(adata, truth):
    cat = catalogue(SPEC)
    for c, e in cat.items():
        if e.get("response") not in ("variance_up", "variance_down"):
            continue
        (prog,) = e["programs"]
        for ct, scale in e["cell_type_scale"].items():
            v = _score(adata, truth, prog, _sel(adata, c, ct)).var()
            v0 = _score(adata, truth, prog, _sel(adata, "control", ct)).var()
            if scale == 0:
                assert 0.7 < v / v0 < 1.4, (c, ct, v, v0)
            elif e["response"] == "variance_up":
                assert v > 2.5 * v0, (c, ct, v, v0)
            else:
                assert v < 0.8 * v0, (c, ct, v, v0)


def test_cell_type_specific_program_effect(adata, truth):
    cat = catalogue(SPEC)
    specific = [c for c, e in cat.items() if "cell_type_scale" in e and min(e["cell_type_scale"].values()) == 0]
    assert specific
    for c in specific:
        (prog,) = cat[c]["programs"]
        want = truth["effects"][c]["expected_log2fc"]["K562"]["0.0"][prog]  # lfc, diluted if only some respond
        got, se = _measured(adata, truth, c, "K562", None, prog, with_se=True)
        assert abs(want) > 0.5 and abs(got - want) < 4 * se, (c, got, want, se)
        got, se = _measured(adata, truth, c, "RPE1", None, prog, with_se=True)
        assert abs(got) < 4 * se and se < 0.1, (c, got, se)


def test_combinations_additive_or_epistatic_by_the_stated_amount(adata, truth):
    cat = catalogue(SPEC)
    combos = {c: e for c, e in cat.items() if e["type"] == "combination"}
    assert {e["combination"] for e in combos.values()} == {k for k, _, _ in COMBOS}
    for c, e in combos.items():
        a, b = e["components"]
        progs = set(cat[a]["programs"]) | set(cat[b]["programs"]) | set(e["epistasis"])
        for p in progs:
            (got, s0), (la, sa), (lb, sb) = (_measured(adata, truth, x, "K562", None, p, with_se=True) for x in (c, a, b))
            want, se = e["epistasis"].get(p, 0.0), math.sqrt(s0 ** 2 + sa ** 2 + sb ** 2)
            assert se < 0.2 and abs(got - la - lb - want) < 4 * se, (c, p, got, la + lb, want, se)
        if e["combination"] == "synergy":
            assert e["epistasis"] == {p: SYNERGY_LOG2FC for p in e["epistasis"]}
        if e["combination"] == "buffering":
            (p, eps), = e["epistasis"].items()
            assert eps == -cat[a]["programs"][p] and abs(_measured(adata, truth, c, "K562", None, p)) < 0.15


def test_dose_response_monotone_hill(adata, truth):
    cat = catalogue(SPEC)
    compounds = [c for c, e in cat.items() if e["type"] == "compound"]
    assert compounds
    for c in compounds:
        for p, top in cat[c]["programs"].items():
            lfc = [_measured(adata, truth, c, None, d, p) for d in DOSES]
            steps = np.diff(lfc) * np.sign(top)
            assert (steps > 0.08).all(), (c, p, lfc)
            assert abs(lfc[-1]) < abs(top) + 0.15


def test_negative_binomial_mean_variance_on_controls(adata):
    cells = _sel(adata, "control", "K562")
    var = adata.var
    genes = np.flatnonzero((var["true_program"] == "").to_numpy())
    x = _dense(adata, cells, genes)
    s = adata.obs["true_size_factor"].to_numpy()[cells].astype(np.float64)
    mu = 2.0 ** var["true_log2_mean_K562"].to_numpy()[genes]
    phi = var["true_dispersion"].to_numpy()[genes]
    mean_pred = mu * s.mean()
    var_pred = mu * s.mean() + mu ** 2 * ((s ** 2).mean() * (1 + phi) - s.mean() ** 2)
    ok = mean_pred > 1.0
    assert ok.sum() > 50
    assert abs(np.median(x.mean(0)[ok] / mean_pred[ok]) - 1) < 0.05
    assert abs(np.median(x.var(0)[ok] / var_pred[ok]) - 1) < 0.1
    # Over-dispersed relative to Poisson with size factors, and the dispersion recovered gene by gene.
    phi_hat = (x.var(0) - mu * s.mean() - mu ** 2 * s.var()) / (mu ** 2 * (s ** 2).mean())
    big = mean_pred > 3.0
    assert np.corrcoef(np.log(np.clip(phi_hat[big], 1e-3, None)), np.log(phi[big]))[0, 1] > 0.6
    assert np.median(x.var(0)[big] / (mean_pred[big] + mu[big] ** 2 * s.var())) > 1.3


def test_atlas_gene_sets_perturbations_and_dataset_covariate():
    names = ("atlas_a", "atlas_b", "atlas_c")
    atlas = synthetic_atlas(SPEC, 400, names)
    assert list(atlas) == list(names)
    genes = {n: set(a.var_names) for n, a in atlas.items()}
    conds = {n: set(a.obs["condition"].astype(str)) for n, a in atlas.items()}
    for i, n in enumerate(names):
        a = atlas[n]
        assert set(a.obs["dataset"]) == {n} and a.var_names.is_unique
        for c in conds[n] - {"control"}:
            for g in read_truth(a)["effects"][c]["target_genes"]:
                assert g in genes[n]
        for m in names[i + 1:]:
            jac = len(genes[n] & genes[m]) / len(genes[n] | genes[m])
            assert 0.4 < jac < 0.95, (n, m, jac)
            assert conds[n] != conds[m] and len(conds[n] & conds[m]) > 1
            shared = sorted(genes[n] & genes[m])
            b0 = [atlas[k].var.loc[shared, "true_log2_mean_K562"] - atlas[k].var.loc[shared, "true_batch_log2"]
                  for k in (n, m)]
            assert np.allclose(b0[0], b0[1])  # one world; datasets differ by their batch offsets only
    assert plan_dataset(SPEC, "atlas_a", 0.8, 0.7) == plan_dataset(SPEC, "atlas_a", 0.8, 0.7)
    assert plan_dataset(SPEC, "atlas_a", 0.8, 0.7) != plan_dataset(SPEC, "atlas_a", 0.8, 0.7, salt=1)


def test_effects_table_and_spec_validation():
    table = effects_markdown(SPEC)
    cat = catalogue(SPEC)
    assert len(table.splitlines()) == 2 + len(cat)
    for word in ("CRISPRi", "CRISPRa", "bimodal", "variance_up", "variance_down", "synergy", "buffering", "Hill"):
        assert word in table
    with pytest.raises(ValueError, match="n_programs"):
        CountSpec(n_programs=5)
    with pytest.raises(ValueError, match="n_genetic"):
        CountSpec(n_genetic=4)
    with pytest.raises(ValueError, match="half of n_genes"):
        CountSpec(n_genes=400)
    assert CountSpec.for_genes(2000) == CountSpec()
    assert CountSpec.for_genes(300, seed=3).program_size == (150 - 8) // 20
    with pytest.raises(ValueError, match="half of n_genes"):
        CountSpec.for_genes(40)
    with pytest.raises(ValueError, match="n_cells"):
        generate_counts(SPEC, 0)


def test_cli_synth_expression(tmp_path):
    import subprocess
    import sys

    import anndata as ad

    out = tmp_path / "s.h5ad"
    cmd = [sys.executable, "-m", "phenoflow.cli", "data", "synth-expression", "--out", str(out), "--cells", "300",
           "--genes", "80"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    a = ad.read_h5ad(out)
    assert a.n_obs == 300 and a.n_vars == 80 and "counts" in a.layers and "control" in set(a.obs["condition"])
    bad = subprocess.run(cmd[:-4] + ["--cells", "0"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--cells=0" in bad.stderr and "Traceback" not in bad.stderr
