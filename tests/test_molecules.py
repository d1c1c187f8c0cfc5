"""Molecule representations (phenoflow/data/molecules.py): Morgan fingerprints equal RDKit called directly,
one molecule -> one vector whatever its spelling or salt form, errors that name the compound and the file,
embedding files (CSV, NPY + names, NPZ, Parquet; by name or by SMILES), the per-run cache, the BBBC021 resplit
and presets."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import rdFingerprintGenerator

from phenoflow.config import resolve
from phenoflow.data import molecules as M
from phenoflow.errors import ConfigError, PhenoflowError

KNOWN = {  # name: SMILES (already neutral, single fragment: standardisation leaves them unchanged)
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "nocodazole": "COC(=O)Nc1nc2cc(C(=O)c3cccs3)ccc2[nH]1",
    "taxol_core": "CC1=C2C(C(=O)C3(C)C(CC4OCC4(C3C(C(C2(C)C)(CC1O)O)OC(=O)c1ccccc1)OC(C)=O)O)OC(C)=O",
}


@pytest.mark.parametrize("radius,size", [(2, 2048), (3, 1024)])
@pytest.mark.parametrize("name", sorted(KNOWN))
def test_fingerprint_equals_rdkit(name, radius, size):
    mol = Chem.MolFromSmiles(KNOWN[name])
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=size)
    bits = np.zeros(size, np.float32)
    bits[list(gen.GetFingerprint(mol).GetOnBits())] = 1
    ours = M.morgan_fingerprint(KNOWN[name], radius, size)
    assert ours.dtype == np.float32 and ours.shape == (size,)
    assert np.array_equal(ours, bits)
    counts = np.zeros(size, np.float32)
    for k, v in gen.GetCountFingerprint(mol).GetNonzeroElements().items():
        counts[k] = v
    assert np.array_equal(M.morgan_fingerprint(KNOWN[name], radius, size, counts=True), counts)


def test_two_smiles_of_one_molecule_give_one_fingerprint():
    spellings = ["CC(=O)Oc1ccccc1C(=O)O",             # aspirin
                 "OC(=O)c1ccccc1OC(C)=O",              # other atom order
                 "CC(=O)OC1=CC=CC=C1C(O)=O",           # Kekule form
                 "CC(=O)Oc1ccccc1C(=O)[O-].[Na+]",     # sodium salt: largest fragment, uncharged
                 "CC(=O)Oc1ccccc1C(=O)O.Cl"]           # with a counter-ion
    keys = {M.canonical_smiles(s) for s in spellings}
    assert keys == {"CC(=O)Oc1ccccc1C(=O)O"}
    fps = [M.morgan_fingerprint(s) for s in spellings]
    assert all(np.array_equal(fps[0], f) for f in fps[1:])
    assert not np.array_equal(fps[0], M.morgan_fingerprint("CC(=O)Nc1ccc(O)cc1"))  # paracetamol differs


def _compounds(smiles: dict[str, str], where="compounds.csv", doses=(0.1, 1.0)):
    cp = M.Compounds(where=where, train_doses=list(doses))
    for name, s in smiles.items():
        cp.label_compound[name] = name
        cp.smiles[name] = s
    return cp


class MolCfg:
    representation, fp_radius, fp_size, fp_counts = "fingerprint", 2, 2048, False
    embeddings, embedding_key, smiles_csv, dose_log = "", "name", "", False

    def __init__(self, **kw):
        self.__dict__.update(kw)


def manifest(names):
    return {"vocabs": {"perturbation": ["control", *names]}, "splits": {}}


def test_invalid_smiles_error_names_compound_and_file(tmp_path):
    cp = _compounds({"aspirin": KNOWN["aspirin"], "badcpd": "C1CC(=O"}, where=str(tmp_path / "meta.csv"))
    with pytest.raises(ConfigError) as e:
        M.build_molecule_table(MolCfg(), manifest(["aspirin", "badcpd"]), tmp_path, compounds=cp)
    assert "badcpd" in str(e.value) and "C1CC(=O" in str(e.value) and str(tmp_path / "meta.csv") in str(e.value)
    assert isinstance(e.value, PhenoflowError)
    with pytest.raises(ConfigError, match="no SMILES"):  # a compound without any SMILES
        M.build_molecule_table(MolCfg(), manifest(["aspirin", "ghost"]), tmp_path,
                               compounds=_with_label(_compounds({"aspirin": KNOWN["aspirin"]}), "ghost"))


def _with_label(cp, name):
    cp.label_compound[name] = name
    return cp


def _write_tables(tmp_path, names, values):
    """The same embedding as CSV, NPY + names, NPZ and Parquet."""
    import pandas as pd

    df = pd.DataFrame(values, columns=[f"e{i}" for i in range(values.shape[1])])
    df.insert(0, "compound", names)
    files = {"csv": tmp_path / "emb.csv", "parquet": tmp_path / "emb.parquet", "npy": tmp_path / "emb.npy",
             "npz": tmp_path / "emb.npz"}
    df.to_csv(files["csv"], index=False)
    df.to_parquet(files["parquet"])
    np.save(files["npy"], values)
    (tmp_path / "emb.names.txt").write_text("\n".join(names) + "\n")
    np.savez(files["npz"], names=np.asarray(names), embeddings=values)
    return files


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npy", "npz"])
def test_embedding_files_by_name_any_width_and_missing_compound(tmp_path, fmt):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 7)).astype(np.float32)  # width 7: any width
    files = _write_tables(tmp_path, ["aspirin", "caffeine", "nocodazole"], values)
    cp = _compounds({k: KNOWN[k] for k in ("aspirin", "caffeine", "nocodazole")})
    mc = MolCfg(representation="embedding", embeddings=str(files[fmt]))
    t = M.build_molecule_table(mc, manifest(["nocodazole", "aspirin"]), tmp_path, compounds=cp)
    assert t.vectors.shape == (3, 7) and t.has_molecule.tolist() == [False, True, True]
    np.testing.assert_allclose(t.vectors[1], values[2], rtol=1e-6)
    np.testing.assert_allclose(t.vectors[2], values[0], rtol=1e-6)
    assert not t.vectors[0].any()  # the control keeps its one-hot row
    cp = _with_label(_compounds({"aspirin": KNOWN["aspirin"], "taxol_core": KNOWN["taxol_core"]}), "taxol_core")
    with pytest.raises(ConfigError) as e:
        M.build_molecule_table(mc, manifest(["aspirin", "taxol_core"]), tmp_path, compounds=cp)
    assert "taxol_core" in str(e.value) and str(files[fmt]) in str(e.value)


def test_embedding_keyed_by_smiles_matches_any_spelling(tmp_path):
    path = tmp_path / "by_smiles.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "a", "b"])
        w.writerow(["OC(=O)c1ccccc1OC(C)=O", 1.0, 2.0])  # aspirin, another spelling than the data's salt form
        w.writerow([KNOWN["caffeine"], 3.0, 4.0])
    cp = _compounds({"asa": "CC(=O)Oc1ccccc1C(=O)[O-].[Na+]", "caf": KNOWN["caffeine"]})
    mc = MolCfg(representation="embedding", embeddings=str(path), embedding_key="smiles")
    t = M.build_molecule_table(mc, manifest(["asa", "caf"]), tmp_path, compounds=cp)
    assert t.vectors[1:].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    cp = _compounds({"asa": KNOWN["aspirin"], "par": "CC(=O)Nc1ccc(O)cc1"})
    with pytest.raises(ConfigError, match=r"'par'.*by_smiles\.csv"):
        M.build_molecule_table(mc, manifest(["asa", "par"]), tmp_path, compounds=cp)


def test_embedding_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "text.csv"
    bad.write_text("compound,a\nx,notanumber\n")
    with pytest.raises(ConfigError, match=r"text\.csv.*non-numeric"):
        M.read_embeddings(bad)
    np.save(tmp_path / "lonely.npy", np.zeros((2, 3)))
    with pytest.raises(ConfigError, match=r"lonely\.npy.*names"):
        M.read_embeddings(tmp_path / "lonely.npy")
    with pytest.raises(ConfigError, match="does not exist"):
        M.read_embeddings(tmp_path / "absent.csv")


def test_fingerprint_table_cache_and_dose_range(tmp_path, monkeypatch):
    cp = _compounds({k: KNOWN[k] for k in ("aspirin", "caffeine")}, doses=(0.3, 3.0, 1.0))
    t = M.build_molecule_table(MolCfg(), manifest(["aspirin", "caffeine"]), tmp_path, tmp_path, compounds=cp)
    assert t.dose_range == (0.3, 3.0)
    assert np.array_equal(t.vectors[1], M.morgan_fingerprint(KNOWN["aspirin"]))
    info = json.loads((tmp_path / "molecules.json").read_text())
    assert info["labels"]["aspirin"]["key"] == "CC(=O)Oc1ccccc1C(=O)O" and info["width"] == 2048
    with np.load(tmp_path / "molecules.npz") as z:
        assert sorted(z["keys"].tolist()) == sorted(M.canonical_smiles(KNOWN[k]) for k in ("aspirin", "caffeine"))

    def boom(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(M, "morgan_fingerprint", boom)
    t2 = M.build_molecule_table(MolCfg(), manifest(["aspirin", "caffeine"]), tmp_path, tmp_path, compounds=cp)
    assert np.array_equal(t.vectors, t2.vectors)
    with pytest.raises(AssertionError, match="cache"):  # other settings: recomputed
        M.build_molecule_table(MolCfg(fp_size=1024), manifest(["aspirin"]), tmp_path, tmp_path, compounds=cp)


def test_resplit_cellflux_csv_and_bbbc021_presets(tmp_path):
    src = tmp_path / "meta.csv"
    rows = [("Week1_1_1_1_1.0", "train", "taxol", "CCO"), ("Week1_1_1_1_2.0", "test", "taxol", "CCO"),
            ("Week1_1_1_1_3.0", "train", "AZ841", "CCN"), ("Week1_1_1_1_4.0", "test", "AZ841", "CCN"),
            ("Week1_1_1_1_5.0", "test", "DMSO", "")]
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["SAMPLE_KEY", "SPLIT", "CPD_NAME", "SMILES"])
        w.writerows(rows)
    counts = M.resplit_csv(src, tmp_path / "out" / "resplit.csv", ["az841"])
    assert counts == {"train": 1, "seen": 2, "unseen_train": 1, "unseen": 1}
    got = list(csv.DictReader((tmp_path / "out" / "resplit.csv").read_text().splitlines()))
    assert [r["SPLIT"] for r in got] == ["train", "seen", "unseen_train", "unseen", "seen"]
    assert (tmp_path / "out" / "compounds.csv").read_text().splitlines()[1:] == ["AZ841,CCN", "taxol,CCO"]
    with pytest.raises(ConfigError, match="docetaxel"):
        M.resplit_csv(src, tmp_path / "x.csv", ["docetaxel"])
    c = resolve("bbbc021", [])
    assert (c.data.image_size, c.data.channels, c.eval.split) == (96, 3, "seen")
    assert c.mol.unseen == list(M.BBBC021_UNSEEN) and len(c.mol.unseen) == 8
    m = resolve("bbbc021-morgan", [])
    assert (m.mol.conditioning, m.mol.representation, m.train.trainable, m.eval.split) == (
        "adaptor", "fingerprint", "adaptor", "unseen")
    assert (m.mol.fp_radius, m.mol.fp_size, m.mol.adaptor_depth) == (2, 2048, 6)
    with pytest.raises(ConfigError, match="mol.conditioning=adaptor"):
        resolve("bbbc021", ["train.trainable=adaptor"])
