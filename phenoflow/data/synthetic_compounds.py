"""A synthetic unseen-compound benchmark: real molecules, morphological effects that are a known function of
their RDKit descriptors, unseen compounds split off by Butina cluster (docs/molecules.md).

Molecules: drawn (seeded) from the NCI set shipped with the rdkit wheel (RDConfig.RDDataDir/NCI/first_5K.smi),
kept when they parse and standardise (phenoflow.data.molecules.standardize) and have 8..40 heavy atoms.
Descriptors of the standardised molecule, each turned into a bounded score:
    z_logP = tanh((Crippen logP - 2.0) / 1.5)
    z_tpsa = tanh((TPSA - 60) / 30)
    z_arom = tanh((aromatic ring count - 1.5) / 1.0)
Effect of compound j at dose d (multipliers on the synthetic renderer's quantities, phenoflow/data/synthetic.py),
with strength s(d) = dose_strength(d) in [0.25, 1] (log-spaced doses DOSES):
    nucleus_size      = exp(0.3 a s z_logP)
    cytoplasm_size    = exp(0.25 a s z_tpsa)
    intensity[DNA]    = exp(0.8 a s z_logP)
    intensity[ch 1]   = exp(0.8 a s z_tpsa)         (tubulin / ER)
    intensity[ch 2]   = exp(0.8 a s z_arom)         (actin)
with a = `effect_scale` (1 by default).
    elongation, texture = 1
The control (DMSO) has every multiplier 1. Everything else (cells, texture, batch effects, noise) is the
synthetic renderer's, drawn from (seed, split, sample index).

Unseen compounds: Butina clustering (Tanimoto distance on Morgan bits, radius 2, 2048 bits, threshold
`cutoff`) of the drawn molecules; whole clusters, taken in a seeded order, go to the unseen set until it holds
`unseen_fraction` of the compounds. Splits: `train` (controls and seen compounds), `seen` (held-out images of
seen compounds and controls), `unseen` (images of unseen compounds only; never trained on).
Labels: sample i of a split cycles experiments (i % E), then the split's compounds (control included in train
and seen), then doses; every label block is balanced.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .synthetic import (
    MAX_CELLS,
    SyntheticSpec,
    _render,
    _upsample_matrix,  # noqa: F401  (the renderer's helper; re-exported for tests)
    cell_type_factors,
    channel_names,
    dose_strength,
)
from .vocab import CONTROL

CONTROL_SMILES = "CS(C)=O"  # DMSO
SPLITS = ("train", "seen", "unseen")


@dataclass(frozen=True)
class CompoundSpec:
    num_compounds: int = 24
    unseen_fraction: float = 0.25
    cutoff: float = 0.7  # Butina distance threshold (1 - Tanimoto)
    image_size: int = 24
    channels: int = 3
    num_experiments: int = 2
    doses: tuple[float, ...] = (0.3, 3.0)
    effect_scale: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render_spec(self) -> SyntheticSpec:
        return SyntheticSpec(image_size=self.image_size, channels=self.channels, num_perturbations=1,
                             num_experiments=self.num_experiments, seed=self.seed)


def nci_smiles() -> list[tuple[str, str]]:
    """(id, SMILES) of the NCI set shipped with rdkit (RDConfig.RDDataDir/NCI/first_5K.smi)."""
    from rdkit import RDConfig

    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out.append((f"NCI{parts[1]}", parts[0]))
    return out


def descriptors(mol) -> dict[str, float]:
    from rdkit.Chem import Crippen, rdMolDescriptors

    return {"logp": float(Crippen.MolLogP(mol)), "tpsa": float(rdMolDescriptors.CalcTPSA(mol)),
            "aromatic_rings": float(rdMolDescriptors.CalcNumAromaticRings(mol))}


def scores(d: dict[str, float]) -> tuple[float, float, float]:
    """(z_logP, z_tpsa, z_arom) of the module doc."""
    return (float(np.tanh((d["logp"] - 2.0) / 1.5)), float(np.tanh((d["tpsa"] - 60.0) / 30.0)),
            float(np.tanh((d["aromatic_rings"] - 1.5) / 1.0)))


def compound_factors(d: dict[str, float] | None, dose: float, channels: int, scale: float = 1.0) -> dict[str, Any]:
    """The renderer's factors (synthetic.perturbation_factors' layout) of a compound at a dose; None = control."""
    f = {"kind": "compound", "direction": 0, "nucleus_size": 1.0, "elongation": 1.0, "cytoplasm_size": 1.0,
         "intensity": [1.0] * channels, "texture": 1.0, "target_channel": None}
    if d is None:
        return f
    zl, zt, za = scores(d)
    s = dose_strength(dose) * scale
    f["nucleus_size"] = float(np.exp(0.3 * s * zl))
    f["cytoplasm_size"] = float(np.exp(0.25 * s * zt))
    f["intensity"][0] = float(np.exp(0.8 * s * zl))
    f["intensity"][1] = float(np.exp(0.8 * s * zt))
    f["intensity"][2] = float(np.exp(0.8 * s * za))
    return f


@lru_cache(maxsize=8)
def draw_compounds(num: int, seed: int, cutoff: float, unseen_fraction: float) -> tuple[dict[str, Any], ...]:
    """`num` real molecules with descriptors, cluster ids and an unseen flag (module doc)."""
    from rdkit import DataStructs
    from rdkit.Chem import Descriptors, rdFingerprintGenerator
    from rdkit.ML.Cluster import Butina

    from .molecules import canonical_smiles, standardize

    pool = nci_smiles()
    order = np.random.default_rng([seed, 0xC0DE]).permutation(len(pool))
    chosen, seen_keys = [], set()
    for i in order:
        name, smi = pool[i]
        try:
            mol = standardize(smi, name)
        except Exception:  # noqa: BLE001, S112 - an NCI entry RDKit cannot standardise is skipped
            continue
        if not 8 <= mol.GetNumHeavyAtoms() <= 40 or Descriptors.NumRadicalElectrons(mol):
            continue
        key = canonical_smiles(smi)
        if key in seen_keys:
            continue
        seen_keys.add(key)
        chosen.append({"name": name, "smiles": smi, "canonical": key, "mol": mol, **descriptors(mol)})
        if len(chosen) == num:
            break
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(c["mol"]) for c in chosen]
    dists = []
    for i in range(1, len(fps)):
        sims = DataStructs.BulkTanimotoSimilarity(fps[i], fps[:i])
        dists.extend(1 - x for x in sims)
    clusters = Butina.ClusterData(dists, len(fps), cutoff, isDistData=True)
    want = max(1, round(unseen_fraction * len(chosen)))
    unseen: set[int] = set()
    for ci in np.random.default_rng([seed, 0x5EE]).permutation(len(clusters)):
        if len(unseen) >= want:
            break
        if len(unseen) + len(clusters[ci]) <= want + 1:
            unseen.update(clusters[ci])
    cluster_of = {m: ci for ci, c in enumerate(clusters) for m in c}
    out = []
    for i, c in enumerate(chosen):
        c = {k: v for k, v in c.items() if k != "mol"}
        c.update(cluster=int(cluster_of[i]), unseen=i in unseen)
        out.append(c)
    return tuple(out)


def split_compounds(spec: CompoundSpec) -> dict[str, list[dict[str, Any]]]:
    comps = draw_compounds(spec.num_compounds, spec.seed, spec.cutoff, spec.unseen_fraction)
    return {"seen": [c for c in comps if not c["unseen"]], "unseen": [c for c in comps if c["unseen"]]}


def labels_of(spec: CompoundSpec, split: str, i: int) -> tuple[dict[str, Any] | None, int, float]:
    """(compound or None for the control, experiment, dose) of sample i of a split."""
    groups = split_compounds(spec)
    comps = groups["unseen"] if split == "unseen" else [None, *groups["seen"]]
    E = spec.num_experiments
    e, j = i % E, (i // E) % len(comps)
    c = comps[j]
    dose = float(spec.doses[(i // (E * len(comps))) % len(spec.doses)]) if c is not None else 0.0
    return c, e, dose


def _draw(spec: CompoundSpec, split: str, i: int, g1: int, g2: int) -> dict[str, Any]:
    """Sample i's parameters: synthetic._draw_params with the compound's factors (cell type 0)."""
    S, C = spec.image_size, spec.channels
    rng = np.random.default_rng([spec.seed, zlib.crc32(split.encode()), i])
    c, e, dose = labels_of(spec, split, i)
    pf = compound_factors(None if c is None else c, dose, C, spec.effect_scale)
    nuc_t, cyt_t = cell_type_factors(0)
    n_cells = int(rng.integers(2, MAX_CELLS + 1))
    xy = np.concatenate([rng.normal(0.5, 0.07, size=(1, 2)), rng.uniform(0.08, 0.92, size=(MAX_CELLS - 1, 2))]) * S
    radius = 0.095 * S * nuc_t * pf["nucleus_size"] * np.exp(rng.normal(0, 0.1, MAX_CELLS))
    aspect = np.maximum(1.25 * pf["elongation"] * np.exp(rng.normal(0, 0.1, MAX_CELLS)), 1.0)
    cyto = 2.0 * cyt_t * pf["cytoplasm_size"] * np.exp(rng.normal(0, 0.08, MAX_CELLS))
    return {"k": 0, "e": e, "t": 0, "dose": dose, "pf": pf, "compound": c,
            "xy": xy, "a": radius * np.sqrt(aspect), "b": radius / np.sqrt(aspect), "cyto": cyto,
            "angle": rng.uniform(0, np.pi, MAX_CELLS), "active": (np.arange(MAX_CELLS) < n_cells).astype(np.float32),
            "bright": np.exp(rng.normal(0, 0.1, MAX_CELLS)),
            "coarse": rng.standard_normal((C + 1, g1, g1), dtype=np.float32),
            "fine": rng.standard_normal((C, g2, g2), dtype=np.float32),
            "pixel": rng.random((S, S, C), dtype=np.float32)}


def generate(spec: CompoundSpec, split: str, n: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """n images (n, H, W, C) uint8 of a split with metadata (key, perturbation, compound, smiles, dose, ...)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    g1, g2 = 5, max(4, spec.image_size // 4)
    rs = spec.render_spec()
    images, meta = [], []
    for lo in range(0, n, 64):
        ps = [_draw(spec, split, i, g1, g2) for i in range(lo, min(lo + 64, n))]
        images.append(_render(rs, ps))
        for i, p in zip(range(lo, lo + len(ps)), ps):
            c = p["compound"]
            meta.append({"key": f"{split}_{i:08d}", "perturbation": CONTROL if c is None else c["name"],
                         "compound": "DMSO" if c is None else c["name"],
                         "smiles": CONTROL_SMILES if c is None else c["smiles"],
                         "experiment": f"exp_{p['e'] + 1:02d}", "cell_type": "MCF7", "dose": p["dose"],
                         "is_control": c is None, "split": split, "index": i})
    return np.concatenate(images), meta


def describe(spec: CompoundSpec) -> dict[str, Any]:
    """The ground truth: per compound its SMILES, descriptors, scores, cluster, split and factors per dose."""
    chans = channel_names(spec.channels)
    out = {}
    for c in draw_compounds(spec.num_compounds, spec.seed, spec.cutoff, spec.unseen_fraction):
        d = {k: c[k] for k in ("logp", "tpsa", "aromatic_rings")}
        out[c["name"]] = {"smiles": c["smiles"], "canonical": c["canonical"], **d, "scores": scores(d),
                          "cluster": c["cluster"], "unseen": c["unseen"],
                          "doses": {str(x): {k: (dict(zip(chans, v)) if k == "intensity" else v)
                                             for k, v in compound_factors(d, x, spec.channels, spec.effect_scale).items()
                                             if k in ("nucleus_size", "cytoplasm_size", "intensity")}
                                    for x in spec.doses}}
    return out


def write_benchmark(spec: CompoundSpec, out_dir: str | Path, counts: dict[str, int],
                    samples_per_shard: int = 512) -> Path:
    """Shards of the train / seen / unseen splits in out_dir (manifest source: the spec and the compound table;
    compounds.csv with compound,smiles beside them). Reused when out_dir's manifest has the same spec."""
    import json

    from .shards import load_manifest, write_shards

    out = Path(out_dir)
    want = {"kind": "synthetic_compounds", "spec": spec.to_dict(), "counts": dict(counts)}
    if (out / "manifest.json").is_file():
        src = load_manifest(out).get("source", {})
        if {k: src.get(k) for k in want} == json.loads(json.dumps(want)):
            return out
    images, meta = [], []
    for split, n in counts.items():
        im, m = generate(spec, split, n)
        images.append(im)
        meta += m
    out.mkdir(parents=True, exist_ok=True)
    comps = draw_compounds(spec.num_compounds, spec.seed, spec.cutoff, spec.unseen_fraction)
    table = {c["name"]: {"smiles": c["smiles"], "unseen": c["unseen"], "cluster": c["cluster"]} for c in comps}
    write_shards(np.concatenate(images), meta, out, samples_per_shard, channels=channel_names(spec.channels),
                 source={**want, "compounds": table})
    tmp = out / f".compounds.csv.tmp{os.getpid()}"
    tmp.write_text("compound,smiles\n" + "".join(f"{c['name']},{c['smiles']}\n" for c in comps))
    tmp.replace(out / "compounds.csv")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m phenoflow.data.synthetic_compounds OUT [--compounds N] [--train N] [--seen N] [--unseen N]`."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m phenoflow.data.synthetic_compounds")
    ap.add_argument("out")
    ap.add_argument("--compounds", type=int, default=48)
    ap.add_argument("--train", type=int, default=2048)
    ap.add_argument("--seen", type=int, default=128)
    ap.add_argument("--unseen", type=int, default=192)
    ap.add_argument("--image-size", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--effects", action="store_true", help="print the ground-truth table (JSON)")
    a = ap.parse_args(argv)
    spec = CompoundSpec(num_compounds=a.compounds, image_size=a.image_size, seed=a.seed)
    if a.effects:
        print(json.dumps(describe(spec), indent=1))
    out = write_benchmark(spec, a.out, {"train": a.train, "seen": a.seen, "unseen": a.unseen})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
