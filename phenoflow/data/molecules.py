"""Molecule representations for compound perturbations (docs/molecules.md; MiT paper section 5).

SMILES -> standardised molecule (RDKit rdMolStandardize; ARCHITECTURE.md section 5):
    mol = SanitizeMol(Uncharger(LargestFragment(Cleanup(MolFromSmiles(s)))))
i.e. salts and solvents dropped (largest organic fragment kept), charges neutralised where a neutral form
exists, then sanitised (needed before descriptors). Its canonical SMILES (Chem.MolToSmiles) is the key of
everything below, so two spellings of one molecule (or a salt form) give one vector.

Representations (`mol.representation`):
  fingerprint  Morgan fingerprint through rdFingerprintGenerator.GetMorganGenerator(radius, fpSize): bits
               (0/1) or counts, float32 (radius 2, 2048 bits by default; the paper's setting).
  embedding    a precomputed table (e.g. MolGPS) of any width from CSV, NPY (+ names) or Parquet, keyed by
               compound name or by canonical SMILES (`mol.embedding_key`).
A compound with an invalid SMILES, without one, or absent from the embedding table is a ConfigError naming the
compound and the file it came from.

The run's molecule table (`build_molecule_table`): one row per perturbation label of the data's vocabulary
(labels that are controls have none and keep the one-hot row); a label maps to its compound through the
samples' `compound` / `smiles` metadata (shard json members, or a compounds CSV `mol.smiles_csv`).
Per run cache: run_dir/molecules.npz (vectors keyed by canonical SMILES, or compound name for name-keyed
embeddings) and run_dir/molecules.json (settings, label -> compound -> key, dose range), reused when the
settings match.

`python -m phenoflow.data.molecules resplit CSV OUT_CSV --unseen A,B,...` rewrites a CellFlux/IMPA CSV's
SPLIT for unseen-compound work (train / seen / unseen / unseen_train) and writes compounds.csv beside it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phenoflow.errors import ConfigError

CONTROL = "control"
# The MiT split's unseen BBBC021 compounds (ARCHITECTURE.md section 3).
BBBC021_UNSEEN = ("AZ841", "cyclohexamide", "cytochalasin D", "docetaxel", "epothilone B", "lactacystin",
                  "latrunculin B", "simvastatin")
KEY_COLUMNS = ("compound", "name", "cpd_name", "smiles", "key", "id")


# ---- SMILES -> molecule ------------------------------------------------------------------------------------
def _rdkit():
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem.MolStandardize import rdMolStandardize
    except ImportError as e:  # pragma: no cover - rdkit is in the chem extra
        raise ConfigError("molecule conditioning needs RDKit: pip install 'phenoflow[chem]'") from e
    RDLogger.DisableLog("rdApp.*")
    return Chem, rdMolStandardize


def standardize(smiles: str, compound: str = "", where: str = ""):
    """The standardised, sanitised RDKit molecule of `smiles` (module doc); ConfigError naming it if invalid."""
    Chem, std = _rdkit()
    label = f"compound {compound!r} " if compound else ""
    src = f" (from {where})" if where else ""
    mol = Chem.MolFromSmiles(str(smiles)) if smiles and str(smiles).strip() else None
    if mol is None:
        raise ConfigError(f"{label}has an invalid SMILES {smiles!r}{src}")
    try:
        mol = std.Cleanup(mol)
        mol = std.LargestFragmentChooser().choose(mol)
        mol = std.Uncharger().uncharge(mol)
        Chem.SanitizeMol(mol)
    except Exception as e:  # RDKit raises several types for one bad molecule
        raise ConfigError(f"{label}SMILES {smiles!r}{src} cannot be standardised: {e}") from e
    return mol


def canonical_smiles(smiles: str, compound: str = "", where: str = "") -> str:
    """Canonical SMILES of the standardised molecule: the key of fingerprints and SMILES-keyed embeddings."""
    Chem, _ = _rdkit()
    return Chem.MolToSmiles(standardize(smiles, compound, where))


def morgan_fingerprint(smiles_or_mol: Any, radius: int = 2, size: int = 2048, counts: bool = False) -> np.ndarray:
    """(size,) float32 Morgan fingerprint (bits 0/1 or counts) of a standardised molecule or a SMILES."""
    from rdkit.Chem import rdFingerprintGenerator

    mol = standardize(smiles_or_mol) if isinstance(smiles_or_mol, str) else smiles_or_mol
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=size)
    fp = gen.GetCountFingerprintAsNumPy(mol) if counts else gen.GetFingerprintAsNumPy(mol)
    return np.asarray(fp, dtype=np.float32)


# ---- embedding files ---------------------------------------------------------------------------------------
def _key_column(cols: Sequence[str], path: Path) -> str:
    low = {c.lower(): c for c in cols}
    for k in KEY_COLUMNS:
        if k in low:
            return low[k]
    if not cols:
        raise ConfigError(f"embedding file {path}: no columns")
    return cols[0]


def _from_frame(names: list[str], values: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    if values.ndim != 2 or values.shape[0] != len(names):
        raise ConfigError(f"embedding file {path}: {values.shape} values for {len(names)} names")
    if not np.isfinite(values).all():
        bad = names[int(np.argwhere(~np.isfinite(values))[0, 0])]
        raise ConfigError(f"embedding file {path}: non-finite value in the row of {bad!r}")
    dup = {n for n in names if names.count(n) > 1} if len(set(names)) != len(names) else set()
    if dup:
        raise ConfigError(f"embedding file {path}: duplicate keys {sorted(dup)[:5]}")
    return {n: values[i].astype(np.float32) for i, n in enumerate(names)}


def read_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """{key: (F,) float32} from a CSV (a key column: compound / name / smiles / first column; every other
    column numeric), a Parquet file (same), an NPY (N, F) with names in `<file>.names.txt` / `.json` (one per
    row), or an NPZ with arrays `names` and `embeddings`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"embedding file {p} does not exist")
    suf = p.suffix.lower()
    try:
        if suf in (".csv", ".tsv", ".parquet", ".pq"):
            import pandas as pd

            df = pd.read_parquet(p) if suf in (".parquet", ".pq") else pd.read_csv(p, sep="\t" if suf == ".tsv" else ",")
            key = _key_column([str(c) for c in df.columns], p)
            other = [c for c in df.columns if str(c) != key]
            bad = [str(c) for c in other if not np.issubdtype(df[c].dtype, np.number)]
            if bad:
                raise ConfigError(f"embedding file {p}: non-numeric columns {bad[:5]} (one key column, "
                                  f"{list(KEY_COLUMNS)} or the first, then numbers)")
            return _from_frame([str(x) for x in df[key]], df[other].to_numpy(np.float64), p)
        if suf == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return _from_frame([str(x) for x in z["names"]], np.asarray(z["embeddings"], np.float64), p)
        if suf == ".npy":
            values = np.load(p, allow_pickle=False)
            for side in (p.with_suffix(".names.txt"), p.with_suffix(".names.json"), Path(str(p) + ".names.txt")):
                if side.is_file():
                    text = side.read_text()
                    names = json.loads(text) if side.suffix == ".json" else [ln for ln in text.splitlines() if ln]
                    return _from_frame([str(n) for n in names], np.asarray(values, np.float64), p)
            raise ConfigError(f"embedding file {p}: no names file beside it ({p.with_suffix('.names.txt').name} "
                              f"or {p.with_suffix('.names.json').name}, one key per row)")
    except ConfigError:
        raise
    except Exception as e:  # pandas / numpy / pyarrow errors, named with the file
        raise ConfigError(f"embedding file {p}: cannot read it: {type(e).__name__}: {e}") from e
    raise ConfigError(f"embedding file {p}: unknown format {suf!r} (csv, tsv, parquet, npy + names, npz)")


# ---- compounds of a data set -------------------------------------------------------------------------------
@dataclass
class Compounds:
    """Per perturbation label: its compound name and SMILES; doses of the train split's treated samples."""
    label_compound: dict[str, str] = field(default_factory=dict)
    smiles: dict[str, str] = field(default_factory=dict)  # compound -> SMILES as written
    where: str = ""
    train_doses: list[float] = field(default_factory=list)


def read_compounds_csv(path: str | Path) -> dict[str, str]:
    """compound -> SMILES from a CSV with a compound (or name / CPD_NAME) and a smiles column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"mol.smiles_csv={str(p)!r} does not exist")
    with open(p, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    cols = {c.lower(): c for c in (rows[0].keys() if rows else [])}
    name = next((cols[c] for c in ("compound", "name", "cpd_name") if c in cols), None)
    smi = cols.get("smiles")
    if name is None or smi is None:
        raise ConfigError(f"{p}: needs a compound (or name / CPD_NAME) and a smiles column, has {list(cols)}")
    return {r[name]: r[smi] for r in rows if r.get(name) and r.get(smi)}


def scan_compounds(data_dir: str | Path, manifest: dict) -> Compounds:
    """Label -> compound and compound -> SMILES from the samples' json members (read through the shard
    indexes: only the small json members are read), plus the train split's doses of treated samples."""
    from phenoflow.data.shards import read_index

    folder = Path(data_dir)
    out = Compounds(where=str(folder))
    for split, info in manifest.get("splits", {}).items():
        for rec in info.get("shards", []):
            with open(folder / rec["name"], "rb") as f:
                for e in read_index(folder / rec["index"]):
                    if "json" not in e:
                        continue
                    f.seek(e["json"][0])
                    m = json.loads(f.read(e["json"][1]))
                    label = str(m.get("perturbation"))
                    if m.get("is_control") or label == CONTROL:
                        continue
                    cpd = str(m.get("compound") or label)
                    out.label_compound.setdefault(label, cpd)
                    if m.get("smiles"):
                        out.smiles.setdefault(cpd, str(m["smiles"]))
                    if split == "train":
                        out.train_doses.append(float(m.get("dose", 0.0)))
    return out


# ---- the run's molecule table ------------------------------------------------------------------------------
def data_dir_of(cfg) -> Path:
    """The shard folder of a run (phenoflow/data/prepare.py): data.shards, or run_dir/data when synthetic."""
    return Path(cfg.data.shards) if cfg.data.source == "shards" else Path(cfg.run_dir) / "data"


@dataclass
class MoleculeTable:
    labels: list[str]            # the perturbation vocabulary, in id order
    vectors: np.ndarray          # (n_labels, F) float32; zero rows where has_molecule is False
    has_molecule: np.ndarray     # (n_labels,) bool: False for controls
    dose_range: tuple[float, float]
    info: dict[str, Any]


def _settings(mc) -> dict[str, Any]:
    s = {"representation": mc.representation}
    if mc.representation == "fingerprint":
        s.update(radius=mc.fp_radius, size=mc.fp_size, counts=mc.fp_counts)
    else:
        p = Path(mc.embeddings)
        s.update(file=str(p.resolve()), key=mc.embedding_key,
                 sha256=hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
    return s


def _write_atomic(path: Path, writer) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer(tmp)
    tmp.replace(path)


def build_molecule_table(mc, manifest: dict, data_dir: str | Path, run_dir: str | Path | None = None,
                         compounds: Compounds | None = None) -> MoleculeTable:
    """The molecule vector of every perturbation label (module doc). mc: the config's `mol` section."""
    labels = list(manifest["vocabs"]["perturbation"])
    cp = compounds or scan_compounds(data_dir, manifest)
    if mc.smiles_csv:
        cp.smiles.update(read_compounds_csv(mc.smiles_csv))
        cp.where = f"{mc.smiles_csv} / {cp.where}"
    if mc.representation not in ("fingerprint", "embedding"):
        raise ConfigError(f"mol.representation={mc.representation!r} is not 'fingerprint' or 'embedding'")
    settings = _settings(mc)
    cache_json = Path(run_dir) / "molecules.json" if run_dir else None
    cached: dict[str, np.ndarray] = {}
    if cache_json and cache_json.is_file() and (cache_json.parent / "molecules.npz").is_file():
        meta = json.loads(cache_json.read_text())
        if meta.get("settings") == settings:
            with np.load(cache_json.parent / "molecules.npz", allow_pickle=False) as z:
                cached = {str(k): z["vectors"][i] for i, k in enumerate(z["keys"])}
    table = None
    if mc.representation == "embedding":
        if not mc.embeddings:
            raise ConfigError("mol.representation=embedding needs mol.embeddings (a CSV, NPY or Parquet file)")
        table = read_embeddings(mc.embeddings)
        if mc.embedding_key not in ("name", "smiles"):
            raise ConfigError(f"mol.embedding_key={mc.embedding_key!r} is not 'name' or 'smiles'")
        if mc.embedding_key == "smiles":  # re-key the file by canonical SMILES
            table = {canonical_smiles(k, where=mc.embeddings): v for k, v in table.items()}
    rows, keys_of, has = [], {}, []
    for label in labels:
        cpd = cp.label_compound.get(label)
        if label == CONTROL or cpd is None:
            rows.append(None)
            has.append(False)
            continue
        if mc.representation == "embedding" and mc.embedding_key == "name":
            key = cpd
            if key not in table:
                raise ConfigError(f"compound {cpd!r} (label {label!r}) is missing from the embedding file "
                                  f"{mc.embeddings} (keyed by compound name)")
            vec = table[key]
        else:
            if cpd not in cp.smiles:
                raise ConfigError(f"compound {cpd!r} (label {label!r}) has no SMILES in {cp.where or 'the data'} "
                                  f"(give mol.smiles_csv with compound,smiles)")
            key = canonical_smiles(cp.smiles[cpd], cpd, cp.where)
            if mc.representation == "embedding":
                if key not in table:
                    raise ConfigError(f"compound {cpd!r} (canonical SMILES {key}) is missing from the embedding "
                                      f"file {mc.embeddings} (keyed by SMILES)")
                vec = table[key]
            else:
                vec = cached.get(key)
                if vec is None:
                    vec = morgan_fingerprint(standardize(cp.smiles[cpd], cpd, cp.where), mc.fp_radius, mc.fp_size,
                                             mc.fp_counts)
        cached[key] = vec
        keys_of[label] = {"compound": cpd, "key": key}
        rows.append(vec)
        has.append(True)
    widths = {len(v) for v in rows if v is not None}
    if len(widths) > 1:
        raise ConfigError(f"molecule vectors of different widths {sorted(widths)}")
    if not widths:
        raise ConfigError(f"no perturbation label of {data_dir} is a compound with a molecule (labels {labels[:5]})")
    width = widths.pop()
    vectors = np.stack([np.zeros(width, np.float32) if v is None else np.asarray(v, np.float32) for v in rows])
    doses = [d for d in cp.train_doses if np.isfinite(d)]
    rng = (float(min(doses)), float(max(doses))) if doses else (0.0, 1.0)
    if mc.dose_log:  # the range is stored on the scale the adaptor sees
        rng = (float(np.log1p(rng[0])), float(np.log1p(rng[1])))
    info = {"settings": settings, "labels": keys_of, "width": int(width), "dose_range": list(rng),
            "source": cp.where}
    if cache_json:
        keys = sorted(cached)

        def write_npz(t: Path) -> None:
            with open(t, "wb") as f:
                np.savez(f, keys=np.asarray(keys), vectors=np.stack([cached[k] for k in keys]))

        _write_atomic(cache_json.parent / "molecules.npz", write_npz)
        _write_atomic(cache_json, lambda t: Path(t).write_text(json.dumps(info, indent=2, sort_keys=True)))
    return MoleculeTable(labels, vectors, np.asarray(has), rng, info)


# ---- CellFlux / IMPA CSV resplit for unseen compounds ------------------------------------------------------
def resplit_csv(csv_in: str | Path, csv_out: str | Path, unseen: Iterable[str] = BBBC021_UNSEEN,
                compound_col: str = "CPD_NAME", split_col: str = "SPLIT") -> dict[str, int]:
    """Copy a CellFlux CSV with SPLIT rewritten by compound: seen compounds keep `train`, their test rows become
    `seen`; every test row of an unseen compound becomes `unseen` and its train rows `unseen_train` (kept, never
    trained on: the trainer reads split `train` only). Writes compounds.csv (compound, smiles) beside csv_out
    when the CSV has a SMILES column. Returns counts per new split. Unknown unseen names are an error."""
    src, dst = Path(csv_in), Path(csv_out)
    want = {u.lower(): u for u in unseen}
    with open(src, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    for col in (compound_col, split_col):
        if col not in header:
            raise ConfigError(f"{src}: no column {col!r} (columns {header})")
    present = {r[compound_col].lower() for r in rows}
    missing = [u for k, u in want.items() if k not in present]
    if missing:
        raise ConfigError(f"{src}: unseen compounds {missing} do not occur in column {compound_col!r}")
    counts: dict[str, int] = {}
    smiles: dict[str, str] = {}
    smi_col = next((c for c in header if c.lower() == "smiles"), None)
    for r in rows:
        old = r[split_col].strip().lower()
        is_unseen = r[compound_col].lower() in want
        new = ("unseen_train" if old == "train" else "unseen") if is_unseen else ("train" if old == "train" else "seen")
        r[split_col] = new
        counts[new] = counts.get(new, 0) + 1
        if smi_col and r.get(smi_col):
            smiles.setdefault(r[compound_col], r[smi_col])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    if smiles:
        with open(dst.parent / "compounds.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["compound", "smiles"])
            w.writerows(sorted(smiles.items()))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m phenoflow.data.molecules")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resplit", help="rewrite a CellFlux CSV's SPLIT by compound (train / seen / unseen)")
    r.add_argument("csv")
    r.add_argument("out_csv")
    r.add_argument("--unseen", default=",".join(BBBC021_UNSEEN), help="comma-separated compound names")
    f = sub.add_parser("fingerprint", help="print the canonical SMILES and on-bits of a SMILES")
    f.add_argument("smiles")
    f.add_argument("--radius", type=int, default=2)
    f.add_argument("--size", type=int, default=2048)
    a = ap.parse_args(argv)
    if a.cmd == "resplit":
        counts = resplit_csv(a.csv, a.out_csv, [u.strip() for u in a.unseen.split(",") if u.strip()])
        print(json.dumps(counts, sort_keys=True))
    else:
        fp = morgan_fingerprint(a.smiles, a.radius, a.size)
        print(canonical_smiles(a.smiles), np.flatnonzero(fp).tolist())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
