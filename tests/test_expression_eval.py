"""Expression sampling and evaluation: a tiny trained run -> `phenoflow evaluate` -> h5ad predictions that pair
with the reference (genes, perturbation set, real controls, group sizes), every metric, cell-eval reading the pair,
and `phenoflow demo --modality expression` end to end at tiny size."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from phenoflow.config import resolve

sys.path.insert(0, str(Path(__file__).parent))
from test_expression_train import TINY

EVAL = ["eval.split=test", "eval.steps=4", "eval.guidance=[1,2]", "eval.batch_size=16"]
REPORT_FILES = ("metrics.md", "summary.csv", "metrics_w1.csv", "pca_w1.png", "mean_shift_w1.png", "loss.png",
                "predictions/real_test.h5ad", "predictions/pred_w1.h5ad")


def _overrides(tmp, name):
    return [*TINY, *EVAL, "train.total_samples=320", f"run.out_dir={tmp}", f"run.name={name}"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A 10-step tiny run, evaluated through the `phenoflow evaluate` command (expression dispatch)."""
    from phenoflow.cli import main
    from phenoflow.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("expr_eval")
    torch.manual_seed(0)
    Trainer(resolve("expression-demo", _overrides(tmp, "tiny"))).fit()
    assert main(["evaluate", "--preset", "expression-demo", *_overrides(tmp, "tiny")]) == 0
    return tmp / "tiny"


def _pair(run, w="1"):
    import anndata

    pred = anndata.read_h5ad(run / "report" / "predictions" / f"pred_w{w}.h5ad")
    real = anndata.read_h5ad(run / "report" / "predictions" / "real_test.h5ad")
    return pred, real


def test_predictions_pair_with_the_reference(evaluated):
    import json

    pred, real = _pair(evaluated)
    genes = json.loads((evaluated / "export" / "manifest.json").read_text())["genes"]
    assert list(pred.var_names) == list(real.var_names) == genes
    assert list(pred.obs.columns) == list(real.obs.columns) == ["condition", "cell_type", "dataset", "dose"]
    assert set(pred.obs["condition"]) == set(real.obs["condition"]) and "control" in set(real.obs["condition"])
    assert any("+" in c for c in set(real.obs["condition"]))  # the original label string of a combination
    # The prediction's controls are the split's real control cells, values and labels.
    pc, rc = pred[pred.obs["condition"] == "control"], real[real.obs["condition"] == "control"]
    assert list(pc.obs_names) == list(rc.obs_names)
    np.testing.assert_array_equal(np.asarray(pc.X), np.asarray(rc.X))
    # One generated cell per real perturbed cell, group by group.
    key = ["condition", "cell_type", "dataset"]
    assert pred.obs.groupby(key, observed=True).size().to_dict() == real.obs.groupby(key, observed=True).size().to_dict()
    x = np.asarray(pred.X)
    assert x.dtype == np.float32 and np.isfinite(x).all() and x.min() >= 0
    assert x.max() <= pred.uns["phenoflow"]["clamp_max"] + 1e-6
    # Deterministic per group: a second sampling with the same seed writes the same cells.
    from phenoflow.eval.expression.generate import sample_expression

    cfg = resolve("expression-demo", _overrides(evaluated.parent, "tiny") + ["eval.guidance=[1]"])
    again = sample_expression(cfg, out_dir=evaluated / "again")
    import anndata

    np.testing.assert_array_equal(np.asarray(anndata.read_h5ad(again["pred"][1.0]).X), x)


def test_metric_table_has_every_metric_and_the_report_its_files(evaluated):
    import pandas as pd

    from phenoflow.eval.expression import evaluate_expression

    real = _pair(evaluated)[1]
    want = set(evaluate_expression(real, real)["metric"])
    for w in ("1", "2"):
        table = pd.read_csv(evaluated / "report" / f"metrics_w{w}.csv")
        assert set(table["metric"]) == want and np.isfinite(table["value"]).all()
    assert {"rmse", "cosine", "energy_distance", "mmd", "rbf_mmd2", "mae", "discrimination_score_l1",
            "overlap_at_N", "top_k_recall", "r2_score"} <= want
    for f in REPORT_FILES:
        assert (evaluated / "report" / f).is_file(), f
    md = (evaluated / "report" / "metrics.md").read_text()
    assert "| rmse | average |" in md and "vcc:cell-eval" in md and "energy_distance" in md
    # The reference baselines, scored the same way, as columns beside the model.
    assert "| w=1 | w=2 | control baseline | additive baseline |" in md
    for name in ("control", "additive"):
        table = pd.read_csv(evaluated / "report" / f"metrics_baseline_{name}.csv")
        assert set(table["metric"]) == want and np.isfinite(table["value"]).all()
        assert (evaluated / "report" / "predictions" / f"pred_baseline_{name}.h5ad").is_file()


def test_identical_prediction_scores_best(evaluated):
    from phenoflow.eval.expression import evaluate_expression, summarize

    pred, real = _pair(evaluated)

    def means(p):
        s = summarize(evaluate_expression(p, real))
        return {(r.metric, r.aggregation): r.mean for r in s.itertuples()}

    best, model = means(real), means(pred)
    for k in [("rmse", "average"), ("energy_distance", "pca"), ("mmd", "pca"), ("mae", "pseudobulk")]:
        assert best[k] == pytest.approx(0, abs=1e-9) and model[k] > best[k], k
    for k in [("cosine", "logfc"), ("discrimination_score_l1", "vcc:cell-eval"), ("overlap_at_N", "vcc:cell-eval"),
              ("top_k_recall", "scores")]:
        assert best[k] == pytest.approx(1, abs=1e-9) and model[k] <= best[k], k


def test_cell_eval_reads_the_pair(evaluated, tmp_path):
    cell_eval = pytest.importorskip("cell_eval", reason="cell-eval not installed (pip extra 'vcc')")
    from phenoflow.eval.expression import ExpressionSet, discrimination_score_l1, mae

    d = evaluated / "report" / "predictions"
    ev = cell_eval.MetricsEvaluator(adata_pred=str(d / "pred_w1.h5ad"), adata_real=str(d / "real_test.h5ad"),
                                    control_pert="control", pert_col="condition", num_threads=1,
                                    outdir=str(tmp_path / "ce"))
    res, _ = ev.compute(profile="vcc", write_csv=False)
    ce = {r["perturbation"]: r for r in res.to_dicts()}
    p = ExpressionSet.from_anndata(str(d / "pred_w1.h5ad"), covariate_cols=())
    r = ExpressionSet.from_anndata(str(d / "real_test.h5ad"), covariate_cols=())
    ours = {"mae": mae(p, r), "discrimination_score_l1": discrimination_score_l1(p, r)}
    assert set(ce) == set(ours["mae"]) and len(ce) >= 1
    for metric, vals in ours.items():
        for pert, v in vals.items():
            assert v == pytest.approx(ce[pert][metric], abs=1e-6), (metric, pert)


def test_demo_command_writes_the_report(tmp_path):
    """`phenoflow demo --modality expression` (synth -> train -> evaluate) at tiny size, as a user runs it."""
    exe = Path(sys.executable).parent / "phenoflow"
    cmd = [str(exe) if exe.is_file() else sys.executable, *([] if exe.is_file() else ["-m", "phenoflow.cli"]),
           "demo", "--modality", "expression", *TINY, *EVAL, "eval.guidance=[1]", "train.total_samples=128",
           f"run.out_dir={tmp_path}", "run.name=demo"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = tmp_path / "demo" / "report"
    assert f"[demo] report: {report / 'metrics.md'}" in out.stdout
    for f in REPORT_FILES:
        if "w2" not in f:
            assert (report / f).is_file(), f


def test_real_fixture_combine_split_scores_the_held_out_combinations(tmp_path):
    """The real PerturBench fixture (Norman19 + McFaline-Figueroa23 subset) with the `combine` split: a short run,
    then `phenoflow evaluate` on the test split scores exactly the held-out A+B combinations (singles stay in
    training), with every metric finite, as the README's example does."""
    import anndata
    import pandas as pd

    from phenoflow.cli import main
    from phenoflow.train.trainer import Trainer

    fixture = Path(__file__).parent / "data" / "perturbench_devel.h5ad"
    ov = [*TINY, *EVAL, "eval.guidance=[1]", "data.source=anndata", f"expr.h5ad={fixture}", "expr.split_task=combine",
          "train.total_samples=128", f"run.out_dir={tmp_path}", "run.name=devel"]
    torch.manual_seed(0)
    Trainer(resolve("expression-demo", ov)).fit()
    assert main(["evaluate", "--preset", "expression-demo", *ov]) == 0
    report = tmp_path / "devel" / "report"
    from phenoflow.data.expression_splits import read_split_csv

    obs = anndata.read_h5ad(fixture, backed="r").obs
    split = read_split_csv(tmp_path / "devel" / "data" / "split.csv")
    cond = obs["condition"].astype(str).reindex(split.index)
    test_perts = set(cond[split == "test"]) - {"control"}
    train_perts = set(cond[split == "train"])
    assert test_perts and all("+" in p for p in test_perts)  # combine: only combinations are held out
    assert not test_perts & train_perts
    singles = set(cond) & {g for p in test_perts for g in p.split("+")}  # singles the data holds (not TBX3)
    assert singles and singles <= train_perts  # ... and the singles they combine were trained on
    real = anndata.read_h5ad(report / "predictions" / "real_test.h5ad")
    assert set(real.obs["condition"]) - {"control"} == test_perts
    table = pd.read_csv(report / "metrics_w1.csv")
    per_pert = table[table["perturbation"].notna() & (table["perturbation"] != "")]
    assert set(per_pert["perturbation"]) <= test_perts and np.isfinite(table["value"]).all()
    assert {"rmse", "energy_distance", "mae", "discrimination_score_l1"} <= set(table["metric"])
