"""The Python API (issue 13 item 15): phenoflow.load(run folder | export folder) -> sample / counterfactual by
label name, for microscopy (uint8 N,H,W,C) and expression (cells x genes, AnnData); plus the run-config helpers
it rests on (labels by name, umask of atomic writes)."""
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import phenoflow
from phenoflow.config import resolve
from phenoflow.run_config import LabelError, apply_remap, label_remap
from phenoflow.train.trainer import Trainer

TINY = ["data.image_size=16", "data.channels=3", "data.train_images=64", "data.val_images=16",
        "data.samples_per_shard=64", "data.num_perturbations=3", "data.num_experiments=2", "model.size=tiny",
        "model.patch_size=4", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "train.batch_size=16",
        "train.total_samples=32", "train.log_every_samples=32", "train.ckpt_every_samples=32", "train.device=cpu",
        "train.precision=fp32"]
EXPR = ["expr.synth_cells=320", "expr.synth_genes=64", "model.unet_base_channels=8", "model.unet_channel_mult=[1,2]",
        "model.unet_num_res_blocks=1", "train.batch_size=32", "train.total_samples=64", "train.device=cpu",
        "train.precision=fp32", "train.log_every_samples=64", "train.ckpt_every_samples=64",
        "data.samples_per_shard=256"]
FAST = {"solver": "euler", "steps": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    Trainer(resolve("demo", TINY + [f"run.out_dir={out}", "run.name=img"])).fit()
    return out / "img"


@pytest.fixture(scope="module")
def expr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    Trainer(resolve("expression-demo", EXPR + [f"run.out_dir={out}", "run.name=cells"])).fit()
    return out / "cells"


def test_import_is_light():
    code = "import sys, phenoflow; print('torch' in sys.modules, callable(phenoflow.load))"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "True"], r.stderr


def test_sample_by_name_from_run_or_export(run):
    m = phenoflow.load(run, device="cpu")
    assert m.vocabs["perturbation"] == ["control", "gene_01", "gene_02", "gene_03"]
    x = m.sample(perturbation="gene_02", experiment="exp_01", n=5, guidance=2.0, seed=3, **FAST)
    assert x.shape == (5, 16, 16, 3) and x.dtype == np.uint8
    again = phenoflow.load(run / "export", device="cpu").sample(perturbation="gene_02", experiment="exp_01", n=5,
                                                                guidance=2.0, seed=3, **FAST)
    assert np.array_equal(x, again)  # same weights, same seed
    other = m.sample(perturbation="gene_03", experiment="exp_01", n=5, guidance=2.0, seed=3, **FAST)
    assert not np.array_equal(x, other)  # the label reaches the model
    labels = m.labels(2, "gene_02", experiment="exp_02")
    assert labels["perturbation"].tolist() == [2, 2] and labels["experiment"].tolist() == [1, 1]
    assert labels["cell_type"].tolist() == [0, 0]  # a single cell type is taken, not nulled
    assert m.labels(1)["perturbation"].tolist() == [4]  # not given: the null row (unconditional)


def test_unknown_names_list_close_ones(run):
    m = phenoflow.load(run, device="cpu")
    with pytest.raises(LabelError, match=r"unknown perturbation 'gene_2'.*gene_02"):
        m.sample(perturbation="gene_2", n=1, **FAST)
    with pytest.raises(LabelError, match="exp_01"):
        m.sample(perturbation="gene_01", experiment="exp01", n=1, **FAST)
    with pytest.raises(LabelError, match="name"):
        m.sample(perturbation=1, n=1, **FAST)


def test_counterfactual(run):
    m = phenoflow.load(run, device="cpu")
    controls = m.sample(perturbation="control", experiment="exp_02", n=3, **FAST)
    y = m.counterfactual(controls, perturbation="gene_01", experiment="exp_02", guidance=2.0, **FAST)
    assert y.shape == controls.shape and y.dtype == np.uint8
    assert m.counterfactual(controls[0], perturbation="gene_01", **FAST).shape == (16, 16, 3)
    with pytest.raises(phenoflow.api.ConfigError, match=r"\(N, 16, 16, 3\)"):
        m.counterfactual(controls.transpose(0, 3, 1, 2), perturbation="gene_01")


def test_expression_sample(expr_run):
    m = phenoflow.load(expr_run, device="cpu")
    assert m.modality == "expression"
    a, b = m.vocabs["perturbation"][1:3]
    x = m.sample(perturbation=f"{a}+{b}", cell_type=m.vocabs["cell_type"][0], n=7, guidance=2.0, **FAST)
    assert x.shape == (7, len(m.manifest["genes"])) and x.dtype == np.float32 and x.min() >= 0
    ad = m.sample(perturbation=a, n=3, as_anndata=True, **FAST)
    assert list(ad.var_names) == m.manifest["genes"] and list(ad.obs["condition"]) == [a] * 3
    with pytest.raises(LabelError, match="unknown perturbation"):
        m.sample(perturbation=f"{a}+NOPE", n=1, **FAST)
    with pytest.raises(phenoflow.api.ConfigError, match="microscopy"):
        m.counterfactual(np.zeros((1, 4, 4, 3), np.uint8), perturbation=a)


def test_label_remap_by_name():
    model = {"perturbation": ["control", "a", "b", "c"], "gene": ["g1"]}
    assert label_remap(model, {"perturbation": ["control", "a", "b", "c"]}, "d") == {}
    remap = label_remap(model, {"perturbation": ["c", "control", "b"]}, "d")
    ids = torch.tensor([[0, 1], [2, -1]])  # expression combinations, -1 padding kept
    assert apply_remap({"perturbation": ids}, remap)["perturbation"].tolist() == [[3, 0], [2, -1]]
    with pytest.raises(phenoflow.api.ConfigError, match=r"'bb' \(close: b"):
        label_remap(model, {"perturbation": ["control", "bb"]}, "d")


def test_atomic_writes_honour_the_umask(tmp_path):
    from phenoflow.eval.weights import save_state_dict
    from phenoflow.train.checkpoint import save_safetensors, write_json

    old = os.umask(0o027)
    try:
        files = [save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors"),
                 write_json({"x": 1}, tmp_path / "m.json"),
                 save_state_dict(torch.nn.Linear(2, 2), tmp_path / "features.safetensors")]  # converted weights
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in files] == [0o640] * 3


def test_expression_sample_command_writes_named_cells(expr_run, tmp_path, capsys):
    """`phenoflow sample --perturbation A+B --cell-type C -n 5` on an expression run: an h5ad of 5 cells x genes."""
    import anndata

    from phenoflow.cli import main

    m = phenoflow.load(expr_run, device="cpu")
    a, b = m.vocabs["perturbation"][1:3]
    cell = m.vocabs["cell_type"][-1]
    assert main(["sample", "--run-dir", str(expr_run), "--perturbation", f"{a}+{b}", "--cell-type", cell, "-n", "5",
                 "--out", str(tmp_path), "eval.solver=euler", "eval.steps=2", "eval.guidance=[2]"]) == 0
    ad = anndata.read_h5ad(tmp_path / f"{a}_{b}_w2.h5ad")
    assert ad.shape == (5, len(m.manifest["genes"])) and set(ad.obs["cell_type"]) == {cell}
    assert set(ad.obs["condition"]) == {f"{a}+{b}"} and ad.uns["phenoflow"]["w"] == 2.0
    assert main(["sample", "--run-dir", str(expr_run), "--perturbation", "NOPE", "-n", "1"]) == 2
    assert "unknown perturbation 'NOPE'" in capsys.readouterr().err


def test_resume_may_change_failure_detection_timeouts_not_the_model():
    from phenoflow.run_config import resume_allowed

    assert resume_allowed("train.peer_timeout_s") and resume_allowed("train.collective_timeout_s")
    assert resume_allowed("train.total_samples") and resume_allowed("eval.guidance")
    assert not resume_allowed("model.hidden_size") and not resume_allowed("train.lr")
