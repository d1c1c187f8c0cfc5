"""Fixed perturbation vectors for expression models (data/expression_embeddings.py): an embedding table keyed by
component name, or Morgan fingerprints from a compound,smiles CSV, become the perturbation group's fixed matrix
(row = the manifest's vocabulary entry, control row zeros), survive the export, and a missing component is an
error naming it and the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from phenoflow.config import ConfigError, resolve
from phenoflow.train.trainer import Trainer

TINY = ["expr.synth_cells=640", "expr.synth_genes=64", "model.unet_base_channels=8", "model.unet_channel_mult=[1,2]",
        "train.batch_size=32", "train.lr=1e-3", "train.precision=fp32", "train.device=cpu",
        "train.log_every_samples=32", "train.ckpt_every_samples=64", "data.samples_per_shard=256"]


def fixed_of(model) -> torch.Tensor:
    return model.cond.labels["perturbation"].fixed


def test_embedding_table_becomes_the_fixed_matrix(tmp_path):
    import pandas as pd

    first = Trainer(resolve("expression-demo", [*TINY, "train.total_samples=32", f"run.out_dir={tmp_path}",
                                                "run.name=probe"]))
    names = list(first.manifest["vocabs"]["perturbation"])
    control = first.manifest["columns"]["control"]
    first.run_lock.release()
    rng = np.random.default_rng(0)
    vecs = {n: rng.normal(size=5).astype(np.float32) for n in names if n != control}
    pd.DataFrame([{"name": n, **{f"e{i}": v[i] for i in range(5)}} for n, v in vecs.items()]).to_csv(
        tmp_path / "emb.csv", index=False)
    c = resolve("expression-demo", [*TINY, "train.total_samples=64", f"run.out_dir={tmp_path}", "run.name=emb",
                                    f"expr.pert_embeddings={tmp_path / 'emb.csv'}"])
    torch.manual_seed(0)
    tr = Trainer(c)
    F = fixed_of(tr.model)
    assert F.shape == (len(names), 5)
    for i, n in enumerate(names):
        want = np.zeros(5, np.float32) if n == control else vecs[n]
        np.testing.assert_allclose(F[i].numpy(), want, atol=1e-6)
    tr.fit()
    from phenoflow.eval.expression.generate import load_expression_export

    model, _, _ = load_expression_export(c.run_dir, c.eval.ema_std)
    assert torch.equal(fixed_of(model), F)
    # A component without a vector is an error naming it and the file.
    pd.DataFrame([{"name": n, **{f"e{i}": v[i] for i in range(5)}} for n, v in list(vecs.items())[1:]]).to_csv(
        tmp_path / "short.csv", index=False)
    gone = next(iter(vecs))
    bad = resolve("expression-demo", [*TINY, "train.total_samples=32", f"run.out_dir={tmp_path}", "run.name=bad",
                                      f"expr.pert_embeddings={tmp_path / 'short.csv'}"])
    with pytest.raises(ConfigError, match=f"short.csv.*{gone}"):
        Trainer(bad)


def test_smiles_give_morgan_fingerprints(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    from phenoflow.data.synthetic import COMPOUNDS
    from phenoflow.data.synthetic_counts import generate_counts, write_h5ad
    from phenoflow.data.synthetic_counts_effects import CountSpec

    spec = CountSpec(n_genes=64, n_programs=6, program_size=5, n_genetic=0, n_compounds=3, n_combos=0, seed=1)
    write_h5ad(generate_counts(spec, 600), tmp_path / "cpd.h5ad")
    csv = tmp_path / "smiles.csv"
    csv.write_text("compound,smiles\n" + "".join(f"{n},{s}.Cl\n" for n, s in COMPOUNDS[:3]))  # a salt to strip
    c = resolve("expression-demo", [*TINY, "data.source=anndata", f"expr.h5ad={tmp_path / 'cpd.h5ad'}",
                                    "expr.split_task=transfer", "train.total_samples=32", f"run.out_dir={tmp_path}",
                                    "run.name=fp", f"expr.pert_smiles={csv}", "mol.fp_size=256"])
    tr = Trainer(c)
    F = fixed_of(tr.model)
    names = list(tr.manifest["vocabs"]["perturbation"])
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=256)
    for name, smi in COMPOUNDS[:3]:
        if name in names:  # RDKit called directly on the salt-free molecule
            want = gen.GetFingerprintAsNumPy(Chem.MolFromSmiles(smi)).astype(np.float32)
            np.testing.assert_array_equal(F[names.index(name)].numpy(), want)
    assert sum(n in names for n, _ in COMPOUNDS[:3]) >= 2
    assert F[names.index(tr.manifest["columns"]["control"])].abs().sum() == 0
