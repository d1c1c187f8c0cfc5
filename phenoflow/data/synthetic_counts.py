"""Synthetic single-cell perturbation counts with known effects (ground truth for the expression modality).

The world (genes, baselines, dispersions, programs) and the perturbation catalogue are documented in
``phenoflow.data.synthetic_counts_effects``; ``effects_markdown(spec)`` prints the table. This module samples
cells from it and returns AnnData in PerturBench's conventions.

Cell c of a dataset, in cell type t, condition with components K (one single, or ``A+B``), dose d (uM):
    r[c, k] ~ Bernoulli(penetrance_k)                                   responder flags, independent
    shift[c, p] = sum_k r[c, k] s_k(t) L_k,p H_k(d) + [all r] min_k s_k(t) eps_p     program log2 shift
    a[c, p] = sd[c, p] z - sd[c, p]^2 ln(2) / 2 + shift[c, p],   z ~ N(0, 1)
        sd = 0.35, or the responder sd of a variance_up / variance_down component whose s_k(t) > 0
    log2 mu[c, g] = b[t, g] + beta[g] + a[c, prog(g)] + sum_k r[c, k] T_k [g = target_k]
        b: baseline per cell type, beta ~ N(0, 0.15^2): the dataset's per-gene batch offset (log2)
    m[c, g] = s_c 2^log2mu,  s_c = exp(0.35 z' - 0.35^2 / 2)  (log-normal size factor, mean 1)
    counts[c, g] ~ NB(m, phi_g) = Poisson(Gamma(shape 1 / phi_g, scale m phi_g)),  Var = m + phi_g m^2.
Genes outside every program have a = 0. s_k(t) is the cell-type scale, H_k the Hill factor (1 for genes).

Labels are a pure function of the cell index i: with the slot list [control] * control_slots + one slot per
genetic perturbation and combination + one slot per (compound, dose), slot = i % S and cell type =
(i // S) % T, so every block of S T consecutive cells is balanced and controls appear in every cell type.
Randomness comes in blocks of ``BLOCK`` cells, each from a generator seeded by (seed, crc32(dataset), block),
always drawn for the full block: cell i's counts depend on (spec, dataset, i) only, never on ``n_cells``.

Output (``generate_counts``): AnnData, raw counts in ``layers['counts']`` (CSR float32), ``.X`` =
log1p(normalize_total(counts, target_sum=1e4)) (CSR float32, natural log, as scanpy's normalize_total + log1p),
obs ``condition`` (``control``; combinations ``A+B``), ``cell_type``, ``dose`` (uM, 0.0 for all but compounds),
``dataset``, ``perturbation_type`` (control / CRISPRi / CRISPRa / compound / combination), and ground truth
that no model should read: ``true_size_factor`` and ``true_responder`` (every component responded). var:
``true_program``, ``true_dispersion``, ``true_batch_log2``, ``true_log2_mean_<cell type>`` (b + beta).
``uns['phenoflow_synthetic']``: spec, dataset, conventions, programs (genes in this dataset) and, per
condition, its catalogue entry plus ``expected_log2fc[cell type][dose]`` (population log2 fold changes against
the control, exact). ``read_truth`` returns it as plain JSON types (also after an h5ad round trip).
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .synthetic_counts_effects import (
    BATCH_SD,
    DOSES,
    LIBRARY_SD,
    PROGRAM_SD,
    CountSpec,
    catalogue,
    cell_type_names,
    effects_markdown,
    expected_log2fc,
    hill,
    program_name,
    world,
)
from .vocab import CONTROL

__all__ = ["BLOCK", "TARGET_SUM", "CountSpec", "DatasetPlan", "effects_markdown", "generate_counts", "plan_dataset",
           "read_truth", "synthetic_atlas", "write_h5ad"]

BLOCK = 1024
TARGET_SUM = 1e4
LN2 = math.log(2.0)


@dataclass(frozen=True)
class DatasetPlan:
    """Which genes (world indices, sorted) and which conditions (besides control) a dataset holds."""

    name: str
    genes: tuple[int, ...]
    conditions: tuple[str, ...]


def _code(name: str) -> int:
    return zlib.crc32(name.encode())


def plan_dataset(spec: CountSpec, name: str = "synthetic", gene_fraction: float = 1.0,
                 perturbation_fraction: float = 1.0, salt: int = 0) -> DatasetPlan:
    """A dataset's genes and conditions, drawn from (seed, name).

    Each genetic single is kept with ``max(2, round(fraction * n_genetic))`` picks, each compound with
    probability ``fraction``, a combination when both its components are kept; each gene with probability
    ``gene_fraction``, and the targets of kept perturbations always. Fractions of 1 give the whole world;
    ``salt`` > 0 draws another plan for the same name (``synthetic_atlas`` uses it to keep sets distinct).
    """
    if not (0 < gene_fraction <= 1 and 0 < perturbation_fraction <= 1):
        raise ValueError(f"gene_fraction={gene_fraction} and perturbation_fraction={perturbation_fraction} "
                         "must be in (0, 1]")
    w, cat = world(spec), catalogue(spec)
    rng = np.random.default_rng([spec.seed, _code(name), 0x9E7, salt])
    singles = [n for n, e in cat.items() if e["type"] in ("CRISPRi", "CRISPRa")]
    compounds = [n for n, e in cat.items() if e["type"] == "compound"]
    if perturbation_fraction < 1:
        pick = rng.choice(len(singles), size=min(len(singles), max(2, round(perturbation_fraction * len(singles)))),
                          replace=False)
        singles = [singles[i] for i in sorted(pick)]
        compounds = [c for c, u in zip(compounds, rng.random(len(compounds))) if u < perturbation_fraction]
    combos = [n for n, e in cat.items() if e["type"] == "combination" and set(e["components"]) <= set(singles)]
    keep = np.ones(spec.n_genes, bool) if gene_fraction >= 1 else rng.random(spec.n_genes) < gene_fraction
    index = {g: i for i, g in enumerate(w.gene_names)}
    for s in singles:
        keep[index[s]] = True
    conds = tuple(singles + combos + compounds)
    return DatasetPlan(name, tuple(int(g) for g in np.flatnonzero(keep)), conds)


def _slots(spec: CountSpec, plan: DatasetPlan) -> list[tuple[str, float]]:
    cat = catalogue(spec)
    slots = [(CONTROL, 0.0)] * spec.control_slots
    for c in plan.conditions:
        slots += [(c, float(d)) for d in DOSES] if cat[c]["type"] == "compound" else [(c, 0.0)]
    return slots


def _tables(spec: CountSpec, plan: DatasetPlan, slots: list[tuple[str, float]]) -> dict[str, np.ndarray]:
    """Per (slot, cell type) key = slot * T + t: penetrance, program shifts, responder sd, targets, epistasis."""
    cat, w, cts = catalogue(spec), world(spec), cell_type_names(spec.n_cell_types)
    col = {g: i for i, g in enumerate(plan.genes)}
    NP, K = spec.n_programs, len(slots) * len(cts)
    pen, tcol, tfc = np.zeros((K, 2)), np.full((K, 2), -1, np.int64), np.zeros((K, 2))
    L, sd, eps = np.zeros((K, 2, NP)), np.full((K, 2, NP), np.nan), np.zeros((K, NP))
    pidx = {program_name(p): p for p in range(NP)}
    gidx = {n: g for g, n in enumerate(w.gene_names)}
    for s, (cond, dose) in enumerate(slots):
        if cond == CONTROL:
            continue
        comps = cat[cond]["components"]
        for t, ct in enumerate(cts):
            key = s * len(cts) + t
            for j, comp in enumerate(comps):
                e = cat[comp]
                scale = e["cell_type_scale"][ct]
                h = hill(dose, e["hill"]["ec50_uM"], e["hill"]["n"]) if "hill" in e else 1.0
                pen[key, j] = e["penetrance"]
                for p, v in e["programs"].items():
                    L[key, j, pidx[p]] = v * scale * h
                if scale > 0:
                    for p, v in e["program_sd"].items():
                        sd[key, j, pidx[p]] = v
                for g, v in e["target_genes"].items():
                    tcol[key, j], tfc[key, j] = col.get(gidx[g], -1), v
            for p, v in cat[cond].get("epistasis", {}).items():
                eps[key, pidx[p]] = v * min(cat[c]["cell_type_scale"][ct] for c in comps)
    return {"pen": pen, "L": L, "sd": sd, "tcol": tcol, "tfc": tfc, "eps": eps,
            "ncomp": np.array([0 if c == CONTROL else len(cat[c]["components"]) for c, _ in slots])}


def _sample_block(spec: CountSpec, plan: DatasetPlan, tab: dict[str, np.ndarray], S: int, b: int,
                  base: np.ndarray, shape: np.ndarray, phi: np.ndarray, pcols: np.ndarray, pidx: np.ndarray):
    """Counts (BLOCK, genes) int64, size factors, responder flags of block b (always the full block)."""
    T = spec.n_cell_types
    rng = np.random.default_rng([spec.seed, _code(plan.name), b])
    i = b * BLOCK + np.arange(BLOCK)
    slot, t = i % S, (i // S) % T
    key = slot * T + t
    sf = np.exp(LIBRARY_SD * rng.standard_normal(BLOCK) - LIBRARY_SD ** 2 / 2)
    z = rng.standard_normal((BLOCK, spec.n_programs))
    r = rng.random((BLOCK, 2)) < tab["pen"][key]
    sd = np.full(z.shape, PROGRAM_SD)
    for j in range(2):
        over = tab["sd"][key, j]
        use = r[:, j, None] & ~np.isnan(over)
        sd[use] = over[use]
    a = sd * z - sd ** 2 * LN2 / 2 + (r[:, :, None] * tab["L"][key]).sum(1) + (r[:, 0] & r[:, 1])[:, None] * tab["eps"][key]
    lm = base[t]  # fancy indexing: a fresh (BLOCK, G) array
    lm[:, pcols] += a[:, pidx]
    for j in range(2):
        c = tab["tcol"][key, j]
        rows = np.flatnonzero(r[:, j] & (c >= 0))
        lm[rows, c[rows]] += tab["tfc"][key[rows], j]
    lam = rng.standard_gamma(shape, size=lm.shape)
    lam *= np.exp2(lm, out=lm)
    lam *= sf[:, None] * phi
    counts = rng.poisson(lam)
    ncomp = tab["ncomp"][slot]
    responder = (ncomp > 0) & (r[:, 0] | (ncomp < 1)) & (r[:, 1] | (ncomp < 2))
    return counts, sf, responder


def _to_csr_parts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(data float32, column indices int32, nonzeros per row, row totals) of a dense block."""
    flat = counts.ravel()
    nz = np.flatnonzero(flat)
    return (flat[nz].astype(np.float32), (nz % counts.shape[1]).astype(np.int32),
            np.count_nonzero(counts, axis=1), counts.sum(axis=1))


def generate_counts(spec: CountSpec, n_cells: int, dataset: str = "synthetic", plan: DatasetPlan | None = None):
    """``n_cells`` cells of ``dataset`` (the whole world unless ``plan`` restricts it) as AnnData (module doc).

    With a ``plan``, its name is the dataset's name (``dataset`` is then unused)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    if n_cells < 1:
        raise ValueError(f"n_cells={n_cells} must be >= 1")
    plan = plan or plan_dataset(spec, dataset)
    w, cat, cts = world(spec), catalogue(spec), cell_type_names(spec.n_cell_types)
    genes = np.asarray(plan.genes)
    slots = _slots(spec, plan)
    tab, S = _tables(spec, plan, slots), len(slots)
    batch = np.random.default_rng([spec.seed, _code(plan.name), 0xBA7C]).normal(0.0, BATCH_SD, spec.n_genes)[genes]
    base = w.base[:, genes] + batch
    phi = w.dispersion[genes]
    prog = w.program_of_gene[genes]
    pcols = np.flatnonzero(prog >= 0)
    data, idx, nnz, tot, sfs, resp = [], [], [], [], [], []
    for b in range(-(-n_cells // BLOCK)):
        counts, sf, responder = _sample_block(spec, plan, tab, S, b, base, 1.0 / phi, phi, pcols, prog[pcols])
        n = min(BLOCK, n_cells - b * BLOCK)
        d, c, k, s = _to_csr_parts(counts[:n])
        data.append(d), idx.append(c), nnz.append(k), tot.append(s), sfs.append(sf[:n]), resp.append(responder[:n])
    data_a, indptr = np.concatenate(data), np.concatenate([[0], np.cumsum(np.concatenate(nnz))])
    X_counts = sp.csr_matrix((data_a, np.concatenate(idx), indptr), shape=(n_cells, genes.size))
    totals = np.concatenate(tot).astype(np.float64)
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
    xdata = data_a * np.repeat(scale, np.diff(indptr))
    X = sp.csr_matrix((np.log1p(xdata, out=xdata), X_counts.indices.copy(), X_counts.indptr.copy()),
                      shape=X_counts.shape)

    i = np.arange(n_cells)
    slot = i % S
    conds = [CONTROL] + list(plan.conditions)
    ptype = {CONTROL: "control", **{c: cat[c]["type"] for c in plan.conditions}}
    cond_col = np.array([s[0] for s in slots], dtype=object)[slot]
    obs = pd.DataFrame({
        "condition": pd.Categorical(cond_col, categories=conds),
        "cell_type": pd.Categorical(np.array(cts, dtype=object)[(i // S) % len(cts)], categories=cts),
        "dose": np.array([s[1] for s in slots])[slot],
        "dataset": pd.Categorical([plan.name] * n_cells),
        "perturbation_type": pd.Categorical([ptype[c] for c in cond_col],
                                            categories=list(dict.fromkeys(ptype.values()))),
        "true_size_factor": np.concatenate(sfs).astype(np.float32),
        "true_responder": np.concatenate(resp),
    }, index=pd.Index([f"{plan.name}_{k:07d}" for k in i], dtype=object))
    var = pd.DataFrame({"true_program": [program_name(p) if p >= 0 else "" for p in prog],
                        "true_dispersion": phi, "true_batch_log2": batch,
                        **{f"true_log2_mean_{ct}": base[t] for t, ct in enumerate(cts)}},
                       index=pd.Index([w.gene_names[g] for g in genes], dtype=object))
    adata = ad.AnnData(X=X, obs=obs, var=var, layers={"counts": X_counts})
    adata.uns["log1p"] = {"base": None}  # what scanpy's log1p records (natural log)
    adata.uns["phenoflow_synthetic"] = _truth(spec, plan, slots)
    return adata


def _truth(spec: CountSpec, plan: DatasetPlan, slots: list[tuple[str, float]]) -> dict[str, Any]:
    cat, w, cts = catalogue(spec), world(spec), cell_type_names(spec.n_cell_types)
    in_ds = set(plan.genes)
    effects = {}
    for c in plan.conditions:
        doses = sorted({d for s, d in slots if s == c})
        effects[c] = {**cat[c], "expected_log2fc": {ct: {str(d): expected_log2fc(cat, c, ct, d) for d in doses}
                                                    for ct in cts}}
        if c in cat and cat[c]["type"] == "combination":
            effects[c]["additive_log2fc_responders"] = {  # the singles' responder shifts summed (no epistasis)
                ct: {k: v for k, v in _sum_terms(cat, c, ct).items()} for ct in cts}
    return {
        "version": 1, "generator": "phenoflow.data.synthetic_counts", "spec": spec.to_dict(), "dataset": plan.name,
        "X": "log1p(normalize_total(counts, target_sum=1e4)), natural log, float32 CSR",
        "counts_layer": "counts", "control": CONTROL, "combination_delimiter": "+", "dose_unit": "uM",
        "fold_changes": "log2 of mean ratios against control of the same cell type and dataset",
        "cell_types": cts, "conditions": [CONTROL] + list(plan.conditions),
        "programs": {program_name(p): [w.gene_names[g] for g in genes if g in in_ds]
                     for p, genes in enumerate(w.programs)},
        "effects": effects,
    }


def _sum_terms(cat: dict[str, Any], cond: str, ct: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for comp in cat[cond]["components"]:
        e = cat[comp]
        for f, v in {**e["target_genes"], **{p: x * e["cell_type_scale"][ct] for p, x in e["programs"].items()}}.items():
            out[f] = out.get(f, 0.0) + v
    return out


def synthetic_atlas(spec: CountSpec, n_cells: int | dict[str, int] = 5000,
                    datasets: tuple[str, ...] = ("atlas_a", "atlas_b", "atlas_c"), gene_fraction: float = 0.8,
                    perturbation_fraction: float = 0.7) -> dict[str, Any]:
    """Several datasets of one world: overlapping gene sets and perturbation sets (``plan_dataset``), the
    dataset name in ``obs['dataset']`` and its own per-gene batch offset. Returns name -> AnnData, each with its
    own var_names (aligning them to one vocabulary is the loader's job). With a fraction below 1, a plan whose
    condition set repeats an earlier dataset's is redrawn (``salt`` 1, 2, ...; at most 100 tries)."""
    out, seen = {}, []
    for name in datasets:
        n = n_cells[name] if isinstance(n_cells, dict) else n_cells
        for salt in range(100):
            plan = plan_dataset(spec, name, gene_fraction, perturbation_fraction, salt)
            if perturbation_fraction >= 1 or set(plan.conditions) not in seen:
                break
        seen.append(set(plan.conditions))
        out[name] = generate_counts(spec, n, name, plan)
    return out


def write_h5ad(adata, path) -> Path:
    """Write ``adata`` to ``path`` atomically (a temporary file beside it, fsynced, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_truth(adata) -> dict[str, Any]:
    """``uns['phenoflow_synthetic']`` as plain JSON types (arrays from an h5ad round trip become lists)."""
    def plain(x):
        if isinstance(x, dict) or hasattr(x, "items"):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple, np.ndarray)):
            return [plain(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
        if isinstance(x, np.generic):
            return x.item()
        return x
    return plain(adata.uns["phenoflow_synthetic"])
