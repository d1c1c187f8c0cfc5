"""Fixed perturbation vectors for the expression models: prior knowledge about each perturbation component as an
input beside its learned embedding row (model/conditioning.py, equation (3): u(i) = W[i] + P(F[i])).

Two sources (config `expr` section; at most one):
  pert_embeddings  a table keyed by component name, any width: gene embeddings for genetic perturbations (e.g.
                   GenePT / ESM vectors of the target), or compound embeddings (e.g. MolGPS); CSV, TSV, Parquet,
                   NPY + names or NPZ, read by phenoflow.data.molecules.read_embeddings;
  pert_smiles      a compound,smiles CSV: RDKit Morgan fingerprints of the standardised molecules (radius, size
                   and bits/counts from the `mol` section), so chemical perturbations the model never saw as labels
                   still arrive with their structure.
Row i of F belongs to the manifest's perturbation vocabulary entry i (components, the control first); the
control row is zeros. A component missing from the file is an error naming the components and the file: a
silently zero row would make different perturbations look alike to the model.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from phenoflow.errors import ConfigError


def perturbation_vectors(cfg: Any, manifest: dict) -> torch.Tensor | None:
    """(vocabulary size, F) float32 fixed matrix for the `perturbation` group, or None when not configured."""
    e = cfg.expr
    if e.pert_embeddings and e.pert_smiles:
        raise ConfigError(f"expr.pert_embeddings={e.pert_embeddings!r} and expr.pert_smiles={e.pert_smiles!r}: "
                          "choose one source of perturbation vectors")
    if not (e.pert_embeddings or e.pert_smiles):
        return None
    from phenoflow.data import molecules

    names = list(manifest["vocabs"]["perturbation"])
    control = manifest["columns"]["control"]
    if e.pert_embeddings:
        table, where = molecules.read_embeddings(e.pert_embeddings), e.pert_embeddings
    else:
        where = e.pert_smiles
        smiles = molecules.read_compounds_csv(e.pert_smiles)
        m = cfg.mol
        table = {name: molecules.morgan_fingerprint(molecules.standardize(s, name, where), m.fp_radius, m.fp_size,
                                                    m.fp_counts)
                 for name, s in smiles.items() if name in names}
    missing = [n for n in names if n != control and n not in table]
    if missing:
        raise ConfigError(f"{where}: no vector for {len(missing)} perturbation component(s) of the data, e.g. "
                          f"{missing[:10]} (every component needs one; the control's row is zeros)")
    width = len(next(iter(table.values())))
    out = np.zeros((len(names), width), np.float32)
    for i, n in enumerate(names):
        if n != control:
            v = np.asarray(table[n], np.float32).reshape(-1)
            if v.shape[0] != width:
                raise ConfigError(f"{where}: {n!r} has {v.shape[0]} values, others {width}")
            out[i] = v
    return torch.from_numpy(out)
