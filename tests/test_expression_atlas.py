"""An atlas of several AnnData files (`expr.atlas`): each file preprocessed alone, aligned on the union of genes
(default) with the genes a dataset does not measure left out of that dataset's loss, or on the intersection; the
run trains and samples, and its predictions hold 0 where the cell's dataset measures nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from phenoflow.config import ConfigError, resolve
from phenoflow.train.trainer import Trainer

BASE = ["model.unet_base_channels=8", "model.unet_channel_mult=[1,2]", "train.batch_size=32", "train.lr=1e-3",
        "train.precision=fp32", "train.device=cpu", "train.log_every_samples=32", "train.ckpt_every_samples=64",
        "data.samples_per_shard=256", "data.source=anndata", "expr.split_task=transfer", "expr.n_top_genes=60"]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    from phenoflow.data.synthetic_counts import synthetic_atlas, write_h5ad
    from phenoflow.data.synthetic_counts_effects import CountSpec

    tmp = tmp_path_factory.mktemp("atlas")
    spec = CountSpec(n_genes=80, n_programs=4, program_size=8, n_genetic=4, n_compounds=0, n_combos=0, seed=5)
    made = synthetic_atlas(spec, n_cells=400, datasets=("ds_a", "ds_b"), gene_fraction=0.8, perturbation_fraction=1.0)
    files = {}
    for name, ad in made.items():
        files[name] = tmp / f"{name}.h5ad"
        write_h5ad(ad, files[name])
    genes = {n: set(map(str, ad.var_names)) for n, ad in made.items()}
    assert genes["ds_a"] != genes["ds_b"]  # the datasets measure different genes
    return tmp, files


def cfg(tmp, files, name, total, *extra):
    entries = ",".join(f"{n}={p}" for n, p in files.items())
    return resolve("expression-demo", [*BASE, f"expr.atlas=[{entries}]", f"train.total_samples={total}",
                                       f"run.out_dir={tmp}", f"run.name={name}", *extra])


def test_union_atlas_masks_each_datasets_unmeasured_genes_out_of_the_loss(atlas):
    tmp, files = atlas
    torch.manual_seed(0)
    tr = Trainer(cfg(tmp, files, "union", 64))
    m = tr.manifest
    assert m["vocabs"]["dataset"] == ["ds_a", "ds_b"]
    un = m["unmeasured_genes"]
    assert set(un) == {"ds_a", "ds_b"} and all(len(v) > 0 for v in un.values())
    assert not set(un["ds_a"]) & set(un["ds_b"])  # union: every gene is measured by at least one dataset
    # The loss's gradient reaches the model output only at the genes each cell's dataset measures.
    batch = next(iter(tr.loader))
    out = {}
    def keep(mod, args, v):  # returns None: the output is left as it is
        v.retain_grad()
        out["v"] = v

    hook = tr.model.register_forward_hook(keep)
    loss = tr.compute_loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    hook.remove()
    g = out["v"].grad
    ds = batch["dataset"].long()
    for d, name in enumerate(m["vocabs"]["dataset"]):
        rows = ds == d
        if not rows.any():
            continue
        masked = torch.as_tensor(un[name])
        assert torch.all(g[rows][:, masked] == 0), name
        kept = torch.ones(g.shape[1], dtype=torch.bool)
        kept[masked] = False
        assert torch.all(g[rows][:, kept].abs().sum(0) > 0), name
    # Training and sampling: a generated cell holds 0 at its dataset's unmeasured genes.
    tr.fit()
    from phenoflow.eval.expression.generate import sample_expression

    c = cfg(tmp, files, "union", 64, "eval.split=train", "eval.guidance=[1]", "eval.steps=2")
    pred = __import__("anndata").read_h5ad(sample_expression(c)["pred"][1.0])
    gen = pred[pred.obs_names.str.startswith("gen")]
    x = np.asarray(gen.X)
    for name in ("ds_a", "ds_b"):
        rows = (gen.obs["dataset"] == name).to_numpy()
        assert rows.any() and np.all(x[rows][:, un[name]] == 0), name


def test_intersection_atlas_has_no_mask(atlas):
    tmp, files = atlas
    tr = Trainer(cfg(tmp, files, "inter", 32, "expr.atlas_genes=intersection"))
    assert not tr.manifest["unmeasured_genes"] and tr.loss_mask is None
    union = Trainer(cfg(tmp, files, "union2", 32)).manifest["n_genes"]
    assert tr.manifest["n_genes"] < union


def test_atlas_config_errors(atlas, tmp_path):
    tmp, files = atlas
    with pytest.raises(ConfigError, match="not both"):
        cfg(tmp, files, "x", 32, f"expr.h5ad={files['ds_a']}")
    with pytest.raises(ConfigError, match="atlas_genes"):
        cfg(tmp, files, "x", 32, "expr.atlas_genes=outer")
    from phenoflow.data.expression_data import atlas_files

    assert atlas_files(["a=x.h5ad", "dir/b.h5ad"]) == {"a": "x.h5ad", "b": "dir/b.h5ad"}
    with pytest.raises(ConfigError, match="given twice"):
        atlas_files(["a=x.h5ad", "a=y.h5ad"])
