"""Ground truth of the synthetic single-cell count generator: the gene "world" and the perturbation catalogue.

The sampler is ``phenoflow.data.synthetic_counts``; this module holds every number a test or a report may
compare against. All fold changes are log2. Everything listed here is a pure function of ``CountSpec``; the
effect magnitudes below do not even depend on the seed (only which genes form programs and which genes are
targeted do).

World (from ``spec.seed``). Genes ``G0001..`` (G = ``n_genes``). Baseline log2 mean of gene g in cell type t:
    b[t, g] = b0[g] + d[t, g],  b0 ~ N(0, 2.0^2) shifted so that sum_g 2^b0[g] = ``depth`` (mean UMIs per cell),
    d[0, :] = 0; for t >= 1 a random 10% of genes ("markers") get d ~ N(0, 1.0^2), the others 0.
Dispersion phi[g] = clip(exp(N(ln 0.2, 0.6^2)), 0.01, 5): counts ~ NB(mean m, phi), Var = m + phi m^2.
Programs: ``n_programs`` disjoint modules of ``program_size`` genes ("prog01"..), drawn from the more highly
expressed half of the genes (b0 above its median); each gene is in at most one program. Within a program the
genes are co-regulated: a cell's program activity a[c, p] (log2) is shared by all the program's genes,
    a = sd * z - sd^2 ln(2) / 2,  z ~ N(0, 1),  so that E[2^a] = 1  (mean-preserving; sd = 0.35 in controls).
Target genes of the genetic perturbations are drawn from the top quarter (b0 above its 75th percentile), so
that a knockdown is measurable, and belong to no program.

Perturbation catalogue (k = 1..``n_genetic``, a perturbation is named after its target gene):
    modality        CRISPRi for odd k (target log2FC -3.0, to 12.5%), CRISPRa for even k (target log2FC +2.0)
    primary effect  program prog{k:02d} shifted by sign * LEVELS[(k - 1) % 3] (log2), LEVELS = (1.0, 1.5, 2.0),
                    sign = +1 when ((k - 1) // 2) is even, else -1
    response        RESPONSES[(k - 1) % 4]:
                      uniform        every cell responds
                      bimodal        a cell responds with probability 0.4 (partial penetrance); non-responders
                                     look exactly like controls (no target knockdown, no program shift)
                      variance_up    responders' program activity sd 1.0 (instead of 0.35), mean shift kept
                      variance_down  responders' program activity sd 0.0
    cell types      for k % 3 == 0 the program effect (shift and sd change) exists in the first cell type only
                    (scale 0 in the others); the target knockdown happens in every cell type
Compounds j = 1..``n_compounds`` (``synthetic.COMPOUNDS`` names and SMILES), no target gene, every cell
responds; at dose d (uM) a program p_up = prog{P + 2j - 1} moves by +2.0 * H(d) and p_down = prog{P + 2j} by
-1.5 * H(d), with the Hill function H(d) = d^n / (EC50^n + d^n), (EC50, n) = (1.0 uM, 1) for odd j and
(3.0 uM, 2) for even j; doses ``DOSES`` = 0.1, 1, 10 uM (P = n_genetic).
Combinations (the first ``n_combos`` rows of ``COMBOS``, components by k): each component responds
independently (its own penetrance); the log2 shifts of responding components add; the stated epistasis term
is added in cells where every component responds (times the smallest cell-type scale of the components):
    additive    none
    synergy     +1.5 on a program that neither single touches (the next unused program)
    buffering   -L_A on A's program (the combination leaves A's program at control level)
Population expectation: a program's mean in a condition over a control's (same cell type and dataset) is
    E ratio = sum over responder sets R of Pr(R) * 2^(sum_{k in R} s_k L_k + [R = all] eps),
which ``expected_log2fc`` returns as log2 (so a bimodal single with L = 1.5 gives log2(0.6 + 0.4 * 2^1.5)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import product
from typing import Any

import numpy as np

from .synthetic import COMPOUNDS

CELL_TYPES = ("K562", "RPE1", "HEPG2", "JURKAT")
DOSES = (0.1, 1.0, 10.0)  # uM
BASE_SD = 2.0  # log2 sd of gene baselines
MARKER_FRACTION, MARKER_SD = 0.1, 1.0  # cell-type marker genes and their log2 offsets
DISPERSION_MEDIAN, DISPERSION_SD = 0.2, 0.6
PROGRAM_SD = 0.35  # log2 sd of per-cell program activity in controls
LIBRARY_SD = 0.35  # natural-log sd of the per-cell size factor (log-normal, mean 1)
BATCH_SD = 0.15  # log2 sd of the per-gene offset of a dataset (technical batch)
TARGET_LOG2FC = {"CRISPRi": -3.0, "CRISPRa": 2.0}
LEVELS = (1.0, 1.5, 2.0)
RESPONSES = ("uniform", "bimodal", "variance_up", "variance_down")
PENETRANCE = 0.4
RESPONDER_SD = {"variance_up": 1.0, "variance_down": 0.0}
COMPOUND_MAX_LOG2FC = (2.0, -1.5)  # (p_up, p_down)
HILL = ((1.0, 1.0), (3.0, 2.0))  # (EC50 uM, Hill coefficient n) for odd / even compounds
COMBOS = (("additive", 1, 2), ("synergy", 1, 5), ("additive", 3, 4), ("buffering", 5, 7))
SYNERGY_LOG2FC = 1.5


@dataclass(frozen=True)
class CountSpec:
    """Shape of the synthetic world and of its perturbation catalogue (see the module docstring)."""

    n_genes: int = 2000
    n_programs: int = 20
    program_size: int = 25
    n_cell_types: int = 2
    n_genetic: int = 8
    n_compounds: int = 2
    n_combos: int = 4
    depth: float = 3000.0  # mean UMIs per control cell of the first cell type at size factor 1
    control_slots: int = 2  # controls get this many cells per one of each perturbation (per dose)
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("n_genes", "n_programs", "program_size", "n_cell_types", "control_slots"):
            if getattr(self, f) < 1:
                raise ValueError(f"CountSpec.{f}={getattr(self, f)} must be >= 1")
        for f in ("n_genetic", "n_compounds", "n_combos"):
            if getattr(self, f) < 0:
                raise ValueError(f"CountSpec.{f}={getattr(self, f)} must be >= 0")
        if self.n_compounds > len(COMPOUNDS):
            raise ValueError(f"CountSpec.n_compounds={self.n_compounds} exceeds the {len(COMPOUNDS)} compounds")
        if self.n_combos > len(COMBOS):
            raise ValueError(f"CountSpec.n_combos={self.n_combos} exceeds the {len(COMBOS)} combinations")
        need_k = max([max(a, b) for _, a, b in COMBOS[:self.n_combos]], default=0)
        if need_k > self.n_genetic:
            raise ValueError(f"CountSpec.n_combos={self.n_combos} needs n_genetic >= {need_k}")
        if self.programs_needed() > self.n_programs:
            raise ValueError(f"CountSpec.n_programs={self.n_programs}: the catalogue needs {self.programs_needed()}")
        if self.n_programs * self.program_size + self.n_genetic > self.n_genes // 2:
            raise ValueError(f"CountSpec: {self.n_programs} programs x {self.program_size} genes + {self.n_genetic} "
                             f"targets must fit in half of n_genes={self.n_genes}")
        if self.depth <= 0:
            raise ValueError(f"CountSpec.depth={self.depth} must be > 0")

    @classmethod
    def for_genes(cls, n_genes: int, **kw: Any) -> CountSpec:
        """A spec for ``n_genes`` whose program size shrinks (from 25) until programs and targets fit."""
        n_prog, n_gen = kw.get("n_programs", cls.n_programs), kw.get("n_genetic", cls.n_genetic)
        size = min(kw.pop("program_size", cls.program_size), (n_genes // 2 - n_gen) // max(1, n_prog))
        return cls(n_genes=n_genes, program_size=max(1, size), **kw)

    def programs_needed(self) -> int:
        return self.n_genetic + 2 * self.n_compounds + sum(kind == "synergy" for kind, _, _ in COMBOS[:self.n_combos])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class World:
    gene_names: tuple[str, ...]
    base: np.ndarray  # (T, G) log2 baseline mean per cell type (before size factor and dataset batch)
    dispersion: np.ndarray  # (G,)
    program_of_gene: np.ndarray  # (G,) int, -1 = in no program
    programs: tuple[np.ndarray, ...]  # gene indices of each program
    targets: np.ndarray  # (n_genetic,) gene index targeted by genetic perturbation k = 1..P


def cell_type_names(n: int) -> list[str]:
    return [CELL_TYPES[t] if t < len(CELL_TYPES) else f"cell_type_{t + 1:02d}" for t in range(n)]


def program_name(p: int) -> str:
    return f"prog{p + 1:02d}"


@lru_cache(maxsize=32)
def world(spec: CountSpec) -> World:
    """The genes, baselines, dispersions, programs and target genes of ``spec`` (a pure function of it)."""
    G, T = spec.n_genes, spec.n_cell_types
    rng = np.random.default_rng([spec.seed, 0xC0DE])
    b0 = rng.normal(0.0, BASE_SD, size=G)
    b0 += math.log2(spec.depth) - math.log2(np.exp2(b0).sum())
    base = np.repeat(b0[None], T, axis=0)
    for t in range(1, T):
        r = np.random.default_rng([spec.seed, 0xCE11, t])
        markers = r.choice(G, size=max(1, int(MARKER_FRACTION * G)), replace=False)
        base[t, markers] += r.normal(0.0, MARKER_SD, size=markers.size)
    phi = np.clip(np.exp(rng.normal(math.log(DISPERSION_MEDIAN), DISPERSION_SD, size=G)), 0.01, 5.0)
    targets = rng.permutation(np.flatnonzero(b0 > np.quantile(b0, 0.75)))[:spec.n_genetic]
    expressed = rng.permutation(np.setdiff1d(np.flatnonzero(b0 > np.median(b0)), targets))
    programs = tuple(np.sort(expressed[p * spec.program_size:(p + 1) * spec.program_size])
                     for p in range(spec.n_programs))
    program_of_gene = np.full(G, -1, dtype=np.int64)
    for p, genes in enumerate(programs):
        program_of_gene[genes] = p
    width = max(4, len(str(G)))
    names = tuple(f"G{g + 1:0{width}d}" for g in range(G))
    for a in (base, phi, program_of_gene, targets):
        a.flags.writeable = False
    return World(names, base, phi, program_of_gene, programs, targets)


def hill(dose: float, ec50: float, n: float) -> float:
    """H(d) = d^n / (EC50^n + d^n); 0 at dose 0."""
    return 0.0 if dose <= 0 else float(dose ** n / (ec50 ** n + dose ** n))


def catalogue(spec: CountSpec) -> dict[str, dict[str, Any]]:
    """Every perturbation of the world: name -> its documented effect (JSON types only, no None).

    Keys: type (CRISPRi / CRISPRa / compound / combination), components (names of the singles), target_genes
    (gene -> log2FC in responders), programs (program -> log2FC in responders, scale 1, compounds at H = 1),
    response, penetrance, program_sd (program -> sd in responders, when changed), cell_type_scale (cell type ->
    multiplier of the program effect), and per type: hill {ec50_uM, n}, smiles (compounds); combination
    (additive / synergy / buffering), epistasis (program -> extra log2FC when all components respond) and
    target_genes (the components' targets) for combinations, whose other effects are their components'.
    """
    w, cts = world(spec), cell_type_names(spec.n_cell_types)
    P = spec.n_genetic
    cat: dict[str, dict[str, Any]] = {}
    singles = []
    for k in range(1, P + 1):
        modality = "CRISPRi" if k % 2 == 1 else "CRISPRa"
        sign = 1.0 if ((k - 1) // 2) % 2 == 0 else -1.0
        prog = program_name(k - 1)
        response = RESPONSES[(k - 1) % len(RESPONSES)]
        name = w.gene_names[w.targets[k - 1]]
        singles.append(name)
        cat[name] = {
            "type": modality, "components": [name], "target_genes": {name: TARGET_LOG2FC[modality]},
            "programs": {prog: sign * LEVELS[(k - 1) % len(LEVELS)]}, "response": response,
            "penetrance": PENETRANCE if response == "bimodal" else 1.0,
            "program_sd": {prog: RESPONDER_SD[response]} if response in RESPONDER_SD else {},
            "cell_type_scale": {ct: (1.0 if (k % 3 != 0 or t == 0) else 0.0) for t, ct in enumerate(cts)},
        }
    for j in range(1, spec.n_compounds + 1):
        name, smiles = COMPOUNDS[j - 1]
        ec50, n = HILL[(j - 1) % len(HILL)]
        cat[name] = {
            "type": "compound", "components": [name], "target_genes": {},
            "programs": {program_name(P + 2 * j - 2): COMPOUND_MAX_LOG2FC[0],
                         program_name(P + 2 * j - 1): COMPOUND_MAX_LOG2FC[1]},
            "response": "uniform", "penetrance": 1.0, "program_sd": {},
            "cell_type_scale": {ct: 1.0 for ct in cts}, "hill": {"ec50_uM": ec50, "n": n}, "smiles": smiles,
        }
    free = P + 2 * spec.n_compounds
    for kind, a, b in COMBOS[:spec.n_combos]:
        A, B = singles[a - 1], singles[b - 1]
        eps: dict[str, float] = {}
        if kind == "synergy":
            eps, free = {program_name(free): SYNERGY_LOG2FC}, free + 1
        elif kind == "buffering":
            eps = {p: -v for p, v in cat[A]["programs"].items()}
        cat[f"{A}+{B}"] = {"type": "combination", "components": [A, B], "combination": kind, "epistasis": eps,
                           "target_genes": {**cat[A]["target_genes"], **cat[B]["target_genes"]}}
    return cat


def _terms(cat: dict[str, Any], name: str, cell_type: str, dose: float) -> dict[str, float]:
    """log2 shifts of one responding single (cell-type scale and Hill factor applied)."""
    e = cat[name]
    h = hill(dose, e["hill"]["ec50_uM"], e["hill"]["n"]) if "hill" in e else 1.0
    out = {g: v for g, v in e["target_genes"].items()}
    out.update({p: v * h * e["cell_type_scale"][cell_type] for p, v in e["programs"].items()})
    return out


def expected_log2fc(cat: dict[str, Any], condition: str, cell_type: str, dose: float = 0.0) -> dict[str, float]:
    """log2 of the population mean over the control mean, per affected program and target gene (exact).

    Sums over the 2^K responder patterns of the K components (module docstring); size factors, cell-type
    baselines and dataset batch cancel against the control of the same cell type and dataset.
    """
    e = cat[condition]
    comps = e["components"]
    singles = [_terms(cat, c, cell_type, dose) for c in comps]
    eps = {p: v * min(cat[c]["cell_type_scale"][cell_type] for c in comps) for p, v in e.get("epistasis", {}).items()}
    feats = sorted(set().union(*singles, eps))
    ratio = dict.fromkeys(feats, 0.0)
    for pattern in product((0, 1), repeat=len(comps)):
        pr = math.prod(cat[c]["penetrance"] if r else 1.0 - cat[c]["penetrance"] for c, r in zip(comps, pattern))
        for f in feats:
            s = sum(t.get(f, 0.0) for t, r in zip(singles, pattern) if r) + (eps.get(f, 0.0) if all(pattern) else 0.0)
            ratio[f] += pr * 2.0 ** s
    return {f: math.log2(v) for f, v in ratio.items()}


def effects_markdown(spec: CountSpec) -> str:
    """The catalogue as a Markdown table (log2 fold changes in responders; for reports and docs)."""
    cat = catalogue(spec)
    lines = [("| condition | type | target log2FC | program log2FC (responders) | response | penetrance | "
              "cell-type scale | dose / epistasis |"), "|---|---|---|---|---|---|---|---|"]
    for name, e in cat.items():
        if e["type"] == "combination":
            epi = ", ".join(f"{p} {v:+.2f}" for p, v in e["epistasis"].items()) or "none"
            lines.append(f"| {name} | combination | sum of singles | sum of singles | per component | independent | "
                         f"per component | {e['combination']}: {epi} |")
            continue
        tg = ", ".join(f"{g} {v:+.1f}" for g, v in e["target_genes"].items()) or "-"
        pr = ", ".join(f"{p} {v:+.2f}" for p, v in e["programs"].items())
        if e["program_sd"]:
            pr += " (sd " + ", ".join(f"{v:.2f}" for v in e["program_sd"].values()) + f", controls {PROGRAM_SD})"
        sc = ", ".join(f"{c} x{v:g}" for c, v in e["cell_type_scale"].items())
        extra = (f"Hill EC50 {e['hill']['ec50_uM']:g} uM, n {e['hill']['n']:g}; doses {', '.join(map(str, DOSES))} uM"
                 if "hill" in e else "-")
        lines.append(f"| {name} | {e['type']} | {tg} | {pr} | {e['response']} | {e['penetrance']:g} | {sc} | "
                     f"{extra} |")
    return "\n".join(lines)
