"""Expression data: reading, validation, log detection, gene selection, vocabularies, atlas alignment.

Real fixture: tests/data/perturbench_devel.h5ad (PerturBench devel subset, BSD-3, see tests/data/README.md).
"""
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ad = pytest.importorskip("anndata")
pytest.importorskip("scanpy")
import scipy.sparse as sp

from phenoflow.data.anndata_io import (
    ExpressionColumns,
    build_expression_vocabs,
    parse_dose,
    read_expression,
    validate_expression,
)
from phenoflow.data.errors import DataError
from phenoflow.data.expression_prep import (
    align_datasets,
    detect_x_state,
    prepare_expression,
)

FIXTURE = Path(__file__).parent / "data" / "perturbench_devel.h5ad"


@pytest.fixture(scope="module")
def devel():
    adata, rep = read_expression(FIXTURE)
    return adata, rep


def small(genes=("G0", "G1", "G2", "G3", "G4", "G5"), n=12, seed=0, counts=True, labels=None, cell_types=None):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(3, 0.3, size=(n, len(genes))).astype(np.float32)
    labels = labels or (["control", "G1", "G1+G2", "G3"] * n)[:n]
    obs = pd.DataFrame({"condition": labels, "cell_type": cell_types or ["ab"[(i // 4) % 2] for i in range(n)],
                        "dose": ["1"] * n}, index=[f"cell{i}" for i in range(n)])
    obs.loc[obs.condition.str.contains("+", regex=False), "dose"] = "1+1"
    a = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=list(genes)))
    if counts:
        a.layers["counts"] = a.X.copy()
    return a


def write(a, tmp_path, name="bad.h5ad"):
    p = tmp_path / name
    a.write_h5ad(p)
    return p


# -- the real fixture ----------------------------------------------------------------------------------------
def test_devel_loads_with_perturbench_columns(devel):
    adata, rep = devel
    assert adata.shape == (5961, 500)
    assert adata.obs["condition"].nunique() == 34
    combos = [c for c in adata.obs["condition"].unique() if "+" in c]
    assert len(combos) == 15
    assert set(adata.obs["cell_type"].unique()) == {"k562", "T98G", "U87MG", "A172"}
    # only TMSB4X of the 31 target genes is measured: 30 counted report entries, labels kept
    assert rep.counts()["missing_target"] == 30
    assert "TMSB4X" not in rep.missing_targets
    assert rep.missing_targets["KLF1"] == ["KLF1", "KLF1+MAP2K6", "KLF1+TGFBR2", "SET+KLF1"]
    assert rep.counts()["no_counts_layer"] == 1


def test_devel_backed_mode_reads_and_validates_the_same(devel):
    adata, rep = devel
    b, rep_b = read_expression(FIXTURE, backed=True, chunk_rows=1000)
    assert b.isbacked and b.shape == adata.shape
    assert rep_b.counts() == rep.counts()
    assert detect_x_state(b, chunk_rows=700).state == "log1p"
    b.file.close()


def test_devel_log1p_detected_and_normalisation_skipped(devel, caplog):
    adata, rep = devel
    with caplog.at_level(logging.INFO, logger="phenoflow.data"):
        res = prepare_expression(adata, report=rep)
    assert res.x_state.state == "log1p" and res.x_state.action == "none"
    assert res.x_state.evidence["uns_log1p"] and res.x_state.evidence["max"] < 7
    assert any("SKIPPED" in r.message and "already log-normalised" in r.message for r in caplog.records)
    # values untouched (no second log1p)
    keep = [list(adata.var_names).index(g) for g in res.genes[:20]]
    np.testing.assert_allclose(res.adata.X[:50, :20].toarray(), adata.X[:50][:, keep].toarray())
    # 48 genes are never detected; the remaining 452 < 4,000: all kept, no selection
    assert res.hvg_flavor == "all" and len(res.genes) == 452
    assert res.to_json()["normalisation"] == "none"


def test_devel_hvg_united_with_targets(devel):
    adata, rep = devel
    res = prepare_expression(adata, report=rep, n_top_genes=100)
    assert res.hvg_flavor == "seurat" and len(res.hvg_genes) == 100
    assert "TMSB4X" in res.genes and res.adata.var.loc["TMSB4X", "perturbation_target"]
    assert len(res.genes) == 100 + len(res.targets_added)
    assert list(res.adata.var_names) == res.genes
    assert res.genes == [g for g in adata.var_names if g in set(res.genes)]  # data order kept


def test_devel_vocabularies(devel):
    adata, _ = devel
    v = build_expression_vocabs(adata.obs)
    pv = v["perturbation"]
    assert pv[0] == "control"
    assert "KLF1+MAP2K6" in pv and "KLF1" in pv and "MAP2K6" in pv
    assert len(pv) == 1 + 31 + 15  # control, every component, every combination
    assert v["cell_type"].names == ["A172", "T98G", "U87MG", "k562"]
    assert v["dataset"].names == ["mcfaline23", "norman19"]


# -- log detection and normalisation on generated data ------------------------------------------------------
def test_counts_are_normalised_and_logged_with_seurat_v3_when_available():
    a = small(genes=[f"G{i}" for i in range(40)], n=60)
    del a.layers["counts"]
    res = prepare_expression(a, n_top_genes=10)
    assert res.x_state.state == "counts" and res.x_state.action == "normalize_total+log1p"
    assert "counts" in res.adata.layers
    x = res.adata.layers["counts"].toarray()
    assert np.all(x == np.round(x))
    full = prepare_expression(a, n_top_genes=40)  # no selection: all genes, check the normalisation itself
    raw = a.X.toarray()
    np.testing.assert_allclose(full.adata.X.toarray(), np.log1p(raw / raw.sum(1, keepdims=True) * 1e4), rtol=1e-5)
    try:
        import skmisc.loess  # noqa: F401
        assert res.hvg_flavor == "seurat_v3"
    except ImportError:
        assert res.hvg_flavor == "seurat" and any("scikit-misc" in n for n in res.notes)
    assert set(res.targets_added) <= {"G1", "G2", "G3"}
    assert {"G1", "G2", "G3"} <= set(res.genes)


def test_normalised_not_logged_gets_log1p_only():
    a = small(n=20, counts=False)
    x = a.X.toarray() + 0.5
    a.X = sp.csr_matrix(x / x.sum(1, keepdims=True) * 1e4)
    dec = detect_x_state(a)
    assert dec.state == "normalized" and dec.action == "log1p"
    res = prepare_expression(a)
    np.testing.assert_allclose(res.adata.X.toarray(), np.log1p(a.X.toarray()[:, :]), rtol=1e-5)


def test_ambiguous_x_is_an_error_not_a_guess():
    a = small(n=20, counts=False)
    a.X = sp.csr_matrix(a.X.toarray() * 37.3 + 0.1)
    a.X[0, 0] = 999.5
    with pytest.raises(DataError, match="x_state"):
        detect_x_state(a, "f.h5ad")
    assert detect_x_state(a, x_state="counts").reason.startswith("x_state='counts'")
    b = small(n=20, counts=False)
    b.uns["log1p"] = {"base": None}
    with pytest.raises(DataError, match="uns\\['log1p'\\]"):
        detect_x_state(b)


# -- bad inputs ------------------------------------------------------------------------------------------------
def test_missing_column_names_file_and_column(tmp_path):
    a = small()
    a.obs = a.obs.rename(columns={"condition": "perturbation_name"})
    p = write(a, tmp_path)
    with pytest.raises(DataError) as e:
        read_expression(p)
    msg = str(e.value)
    assert str(p) in msg and "'condition'" in msg and "perturbation_name" in msg and "cell_type" in msg
    a2, _ = read_expression(p, ExpressionColumns(perturbation="perturbation_name"))
    assert a2.n_obs == 12


def test_missing_covariate_column(tmp_path):
    p = write(small(), tmp_path)
    with pytest.raises(DataError, match="'treatment'.*covariates"):
        read_expression(p, ExpressionColumns(covariates=["cell_type", "treatment"]))


def test_no_control_cells(tmp_path):
    p = write(small(labels=["G1", "G3"] * 6), tmp_path)
    with pytest.raises(DataError, match=r"no control cells.*'control'"):
        read_expression(p)
    a, _ = read_expression(p, ExpressionColumns(control="G3"))
    assert a.n_obs == 12


def test_covariate_value_without_controls_is_named(tmp_path):
    a = small(labels=["control", "G1", "G1", "G3"] * 3, cell_types=["a", "b", "b", "b"] * 3)
    p = write(a, tmp_path)
    with pytest.raises(DataError) as e:
        read_expression(p)
    assert str(p) in str(e.value) and "{'cell_type': 'b'}" in str(e.value)
    _, rep = read_expression(p, controls_per_covariate=False)
    assert rep.n_cells == 12


def test_non_finite_values(tmp_path):
    a = small()
    x = a.X.toarray()
    x[3, 2] = np.nan
    a.X = sp.csr_matrix(x)
    p = write(a, tmp_path)
    with pytest.raises(DataError) as e:
        read_expression(p)
    assert str(p) in str(e.value) and ".X" in str(e.value) and "'cell3'" in str(e.value) and "'G2'" in str(e.value)
    b = small()
    c = b.layers["counts"].toarray()
    c[5, 1] = np.inf
    b.layers["counts"] = c
    with pytest.raises(DataError, match=r"layers\['counts'\] holds 1 non-finite"):
        read_expression(write(b, tmp_path, "b.h5ad"))


def test_negative_counts(tmp_path):
    a = small()
    c = a.layers["counts"].toarray()
    c[4, 0] = -2
    a.layers["counts"] = sp.csr_matrix(c)
    p = write(a, tmp_path)
    with pytest.raises(DataError) as e:
        read_expression(p)
    assert str(p) in str(e.value) and "layers['counts'] holds 1 negative counts" in str(e.value)
    assert "'cell4'" in str(e.value) and "'G0'" in str(e.value)


def test_negative_values_in_x(tmp_path):
    a = small(counts=False)
    a.X = sp.csr_matrix(a.X.toarray() - 1.0)
    with pytest.raises(DataError, match="negative values.*scaled"):
        read_expression(write(a, tmp_path))


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_var_names(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's own "not unique" warning
        p = write(small(genes=("G0", "G1", "G2", "G2", "G4", "G5")), tmp_path)
    with pytest.raises(DataError, match=r"duplicated var_names.*'G2'"):
        read_expression(p)


def test_absent_target_gene_is_a_counted_report_entry(tmp_path, caplog):
    a = small(labels=["control", "G1", "G1+NOPE", "NOPE"] * 3)
    with caplog.at_level(logging.WARNING, logger="phenoflow.data"):
        _, rep = read_expression(write(a, tmp_path))
    assert rep.counts()["missing_target"] == 1
    (e,) = rep.of_kind("missing_target")
    assert e.value == "NOPE" and e.labels == ["G1+NOPE", "NOPE"] and e.count == 6 and e.column == "condition"
    assert any("NOPE" in r.message for r in caplog.records)
    res = prepare_expression(a, report=rep)
    assert "G1" in res.genes and "NOPE" not in res.genes


def test_doses(tmp_path):
    assert parse_dose("1+0.5", 2) == (1.0, 0.5)
    assert parse_dose("2", 2) == (2.0, 2.0)
    assert parse_dose(float("nan"), 1) is None
    a = small()
    a.obs["dose"] = a.obs["dose"].astype(object)
    a.obs.iloc[2, a.obs.columns.get_loc("dose")] = "high"
    with pytest.raises(DataError, match=r"(?s)column 'dose'.*'cell2'.*'high'"):
        read_expression(write(a, tmp_path))
    b = small()
    b.obs = b.obs.drop(columns=["dose"])
    _, rep = read_expression(write(b, tmp_path, "nodose.h5ad"))
    assert rep.counts()["no_dose_column"] == 1 and rep.counts()["no_dataset_column"] == 1


def test_noninteger_counts_layer_is_reported():
    a = small()
    a.layers["counts"] = a.layers["counts"] * 0.5
    rep = validate_expression(a)
    assert rep.counts().get("noninteger_counts") == 1


# -- atlas ------------------------------------------------------------------------------------------------------
def two_datasets():
    a = small(genes=("A", "B", "C", "G1"), n=8, seed=1)
    b = small(genes=("B", "C", "D", "G1", "G3"), n=12, seed=2)
    return a, b


def test_atlas_union_with_mask():
    a, b = two_datasets()
    at = align_datasets({"study_a": a, "study_b": b})
    assert at.mode == "union" and at.genes == ["A", "B", "C", "D", "G1", "G3"]
    assert at.datasets == ["study_a", "study_b"]
    np.testing.assert_array_equal(at.mask, [[1, 1, 1, 0, 1, 0], [0, 1, 1, 1, 1, 1]])
    x = at.adata.X.toarray()
    # values land on the right genes; unmeasured genes are 0 and masked
    np.testing.assert_array_equal(x[:8][:, [0, 1, 2, 4]], a.X.toarray())
    np.testing.assert_array_equal(x[8:][:, [1, 2, 3, 4, 5]], b.X.toarray())
    assert np.all(x[:8][:, [3, 5]] == 0) and np.all(x[8:, 0] == 0)
    cm = at.cell_mask()
    assert cm.shape == (20, 6) and not cm[0, 3] and cm[10, 3]
    np.testing.assert_array_equal(at.adata.layers["counts"].toarray(), x)
    # the source dataset is a covariate, obs_names unique
    assert list(at.adata.obs["dataset"].cat.categories) == ["study_a", "study_b"]
    assert at.adata.obs_names.is_unique
    vocabs = build_expression_vocabs(at.adata.obs, ExpressionColumns(covariates=["cell_type", "dataset"]))
    assert vocabs["dataset"].names == ["study_a", "study_b"]
    np.testing.assert_array_equal(at.adata.varm["dataset_mask"], at.mask.T)
    assert at.adata.uns["atlas_datasets"] == ["study_a", "study_b"]


def test_atlas_intersection_and_fixed_vocabulary(tmp_path):
    a, b = two_datasets()
    at = align_datasets({"a": a, "b": b}, mode="intersection")
    assert at.genes == ["B", "C", "G1"] and at.mask.all()
    assert at.dropped == {"a": 1, "b": 2}
    np.testing.assert_array_equal(at.adata.X.toarray()[8:], b.X.toarray()[:, [0, 1, 3]])
    fixed = align_datasets({"b": b}, genes=["G3", "A", "B"])
    assert fixed.genes == ["G3", "A", "B"] and fixed.mask.tolist() == [[True, False, True]]
    at.adata.write_h5ad(tmp_path / "atlas.h5ad")  # the aligned atlas is a valid h5ad
    back = ad.read_h5ad(tmp_path / "atlas.h5ad")
    assert back.uns["atlas_mode"] == "intersection"


def test_atlas_bad_inputs():
    a, b = two_datasets()
    with pytest.raises(DataError, match="empty"):
        align_datasets({"a": a[:, ["A"]].copy(), "b": b[:, ["D"]].copy()}, mode="intersection")
    with pytest.raises(DataError, match="mode"):
        align_datasets({"a": a}, mode="outer")
