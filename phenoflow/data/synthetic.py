"""Procedural synthetic cell painting: the embedded default data set and the ground truth for tests.

Each crop (S x S pixels, S >= 16) holds 2-4 cells. A cell is an elliptical nucleus inside a larger, noisy-edged
cytoplasm; every channel is a stain drawn from these masks with smooth multiplicative texture:

6 channels, in RxRx1's order (the real data the model targets; its CellFlux RGB projection assumes it):
    0 DNA (Hoechst)           nucleus, chromatin texture
    1 ER (concanavalin A)     cytoplasm, brighter around the nucleus
    2 actin (phalloidin)      cell cortex (a ring at the cell edge) plus a faint cytoplasmic haze
    3 RNA (SYTO 14)           nucleoli (bright spots in the nucleus) plus faint cytoplasm
    4 mitochondria (MitoTracker)  punctate, perinuclear cytoplasm
    5 Golgi / membrane (WGA)  plasma-membrane ring plus a perinuclear Golgi cloud
3 channels (BBBC021-like RGB): 0 DNA, 1 tubulin (cytoplasm), 2 actin (cortex).

Known effects. Perturbation k (``gene_{k:02d}``, k = 1..P; the "control" has none) has one *primary* effect,
chosen by ``kind = KINDS[(k - 1) % 5]`` with direction up when ``((k - 1) // 5)`` is even, down otherwise:
    nucleus_size     nuclear radius x1.35 (up) or x0.75 (down)
    elongation       nuclear aspect ratio x1.8 (up) or x0.77 (down), area kept
    cytoplasm_size   cytoplasm radius (relative to the nucleus) x1.35 or x0.8
    intensity        channel c = (1 + (k - 1) // 5) % C brighter x1.6 or dimmer x0.6
    texture          texture amplitude of every channel x2.0 or x0.4
plus small *secondary* factors on every other quantity, exp(N(0, 0.04)) drawn from a generator keyed by k only.
These numbers do not depend on the seed; ``describe_effects(spec)`` returns the full table.
Compound mode (``compounds=True``): perturbation k is the k-th compound of ``COMPOUNDS`` (real BBBC021 drugs with
SMILES) at a dose in ``DOSES`` (uM); its factors are the gene factors raised to the power ``dose_strength(dose)``.
For genes the dose is 0.0 (not applicable).

Batch effects: experiment e multiplies channel c by gain[e, c] = exp(N(0, 0.12)) and adds offset[e, c] ~ U(0, 0.06)
(fraction of full scale), drawn from (seed, e). Cell types change base nucleus and cytoplasm sizes (``CELL_TYPES``).

Labels cycle with the sample index i: experiment = i % E, perturbation = (i // E) % (P + 1) (0 = control),
cell type = (i // (E (P + 1))) % T, so control wells appear in every experiment and every block of E (P + 1)
consecutive samples is balanced. Everything random about sample i comes from a generator seeded by
(seed, split, i): generating sample i never depends on which other samples were generated.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .vocab import CONTROL

CHANNELS_6 = ("DNA", "ER", "actin", "RNA", "mito", "golgi_membrane")
CHANNELS_3 = ("DNA", "tubulin", "actin")
KINDS = ("nucleus_size", "elongation", "cytoplasm_size", "intensity", "texture")
_UP = {"nucleus_size": 1.35, "elongation": 1.8, "cytoplasm_size": 1.35, "intensity": 1.6, "texture": 2.0}
_DOWN = {"nucleus_size": 0.75, "elongation": 0.77, "cytoplasm_size": 0.8, "intensity": 0.6, "texture": 0.4}
# name, nucleus scale, cytoplasm scale (relative to U2OS).
CELL_TYPES = (("U2OS", 1.0, 1.0), ("HUVEC", 1.1, 1.3), ("HEPG2", 0.85, 0.8), ("RPE", 1.05, 1.15))
# Real compounds of BBBC021's mechanism-of-action set (name, SMILES); the control is the DMSO vehicle.
COMPOUNDS = (
    ("nocodazole", "COC(=O)Nc1nc2cc(C(=O)c3cccs3)ccc2[nH]1"),
    ("colchicine", "COc1cc2c(c(OC)c1OC)-c1ccc(OC)c(=O)cc1[C@@H](NC(C)=O)CC2"),
    ("camptothecin", "CC[C@@]1(O)C(=O)OCc2c1cc1-c3nc4ccccc4cc3Cn1c2=O"),
    ("methotrexate", "CN(Cc1cnc2nc(N)nc(N)c2n1)c1ccc(C(=O)N[C@@H](CCC(=O)O)C(=O)O)cc1"),
    ("mitoxantrone", "OCCNCCNc1ccc(NCCNCCO)c2c1C(=O)c1c(O)ccc(O)c1C2=O"),
    ("simvastatin", "CCC(C)(C)C(=O)O[C@H]1C[C@@H](C)C=C2C=C[C@H](C)[C@H](CC[C@@H]3C[C@@H](O)CC(=O)O3)[C@@H]21"),
    ("demecolcine", "CN[C@H]1CCc2cc(OC)c(OC)c(OC)c2-c2ccc(OC)c(=O)cc21"),
    ("anisomycin", "COc1ccc(C[C@@H]2NC[C@@H](O)[C@@H]2OC(C)=O)cc1"),
    ("cyclohexamide", "C[C@H]1C[C@H](C)C(=O)[C@@H](C1)[C@H](O)CC1CC(=O)NC(=O)C1"),
    ("chlorambucil", "OC(=O)CCCc1ccc(N(CCCl)CCCl)cc1"),
    ("floxuridine", "OC[C@H]1O[C@@H](n2cc(F)c(=O)[nH]c2=O)C[C@@H]1O"),
    ("PP-2", "CC(C)(C)n1nc(-c2ccc(Cl)cc2)c2c(N)ncnc21"),
    ("cisplatin", "N.N.Cl[Pt]Cl"),
    ("mevinolin", "CC[C@H](C)C(=O)O[C@H]1C[C@@H](C)C=C2C=C[C@H](C)[C@H](CC[C@@H]3C[C@@H](O)CC(=O)O3)[C@@H]21"),
)
CONTROL_SMILES = "CS(C)=O"  # DMSO
DOSES = (0.1, 0.3, 1.0, 3.0)  # uM


def dose_strength(dose: float) -> float:
    """Exponent applied to a compound's factors: 0.25, 0.5, 0.75, 1.0 for the four doses (log-spaced)."""
    return float(np.interp(np.log10(dose), np.log10([DOSES[0], DOSES[-1]]), [0.25, 1.0]))


@dataclass(frozen=True)
class SyntheticSpec:
    image_size: int = 96
    channels: int = 6  # 6 (cell painting, RxRx1 order) or 3 (RGB, BBBC021-like)
    num_perturbations: int = 8  # besides the control
    num_experiments: int = 3
    num_cell_types: int = 1
    seed: int = 0
    compounds: bool = False  # perturbations are compounds with SMILES and doses instead of genes

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"SyntheticSpec.image_size={self.image_size} must be >= 16")
        if self.channels not in (3, 6):
            raise ValueError(f"SyntheticSpec.channels={self.channels} must be 3 or 6")
        for f in ("num_perturbations", "num_experiments", "num_cell_types"):
            if getattr(self, f) < 1:
                raise ValueError(f"SyntheticSpec.{f}={getattr(self, f)} must be >= 1")
        if self.compounds and self.num_perturbations > len(COMPOUNDS):
            raise ValueError(f"SyntheticSpec.num_perturbations={self.num_perturbations} exceeds the "
                             f"{len(COMPOUNDS)} compounds available in compound mode")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Names.


def channel_names(channels: int) -> list[str]:
    return list(CHANNELS_6 if channels == 6 else CHANNELS_3)


def perturbation_names(spec: SyntheticSpec) -> list[str]:
    if spec.compounds:
        return [CONTROL] + [COMPOUNDS[k][0] for k in range(spec.num_perturbations)]
    width = max(2, len(str(spec.num_perturbations)))
    return [CONTROL] + [f"gene_{k:0{width}d}" for k in range(1, spec.num_perturbations + 1)]


def experiment_names(spec: SyntheticSpec) -> list[str]:
    width = max(2, len(str(spec.num_experiments)))
    return [f"exp_{e:0{width}d}" for e in range(1, spec.num_experiments + 1)]


def cell_type_names(spec: SyntheticSpec) -> list[str]:
    return [CELL_TYPES[t][0] if t < len(CELL_TYPES) else f"cell_type_{t + 1:02d}" for t in range(spec.num_cell_types)]


# ----------------------------------------------------------------------------------------------------------
# Effects: perturbations (seed-independent), cell types, experiment batch effects (from the seed).


@lru_cache(maxsize=4096)
def _perturbation_factors(k: int, channels: int) -> dict[str, Any]:
    """Factors of perturbation k (0 = control: all ones)."""
    ones = {"kind": "none", "direction": 0, "nucleus_size": 1.0, "elongation": 1.0, "cytoplasm_size": 1.0,
            "intensity": [1.0] * channels, "texture": 1.0, "target_channel": None}
    if k == 0:
        return ones
    kind = KINDS[(k - 1) % len(KINDS)]
    up = ((k - 1) // len(KINDS)) % 2 == 0
    # Secondary effects: small, fixed by k alone.
    sec = np.exp(np.random.default_rng([0x5EC0, k]).normal(0.0, 0.04, size=4 + channels))
    f = {"kind": kind, "direction": 1 if up else -1, "nucleus_size": float(sec[0]), "elongation": float(sec[1]),
         "cytoplasm_size": float(sec[2]), "texture": float(sec[3]), "intensity": [float(x) for x in sec[4:]],
         "target_channel": None}
    factor = (_UP if up else _DOWN)[kind]
    if kind == "intensity":
        c = (1 + (k - 1) // len(KINDS)) % channels
        f["intensity"][c], f["target_channel"] = factor, c
    else:
        f[kind] = factor
    return f


def perturbation_factors(k: int, channels: int, dose: float = 0.0, compounds: bool = False) -> dict[str, Any]:
    """Factors of perturbation index k (0 = control); in compound mode scaled by the dose's strength."""
    f = dict(_perturbation_factors(k, channels))
    if compounds and k > 0:
        s = dose_strength(dose)
        for name in ("nucleus_size", "elongation", "cytoplasm_size", "texture"):
            f[name] = f[name] ** s
        f["intensity"] = [x ** s for x in f["intensity"]]
    else:
        f["intensity"] = list(f["intensity"])
    return f


def cell_type_factors(t: int) -> tuple[float, float]:
    """(nucleus scale, cytoplasm scale) of cell type t."""
    if t < len(CELL_TYPES):
        return CELL_TYPES[t][1], CELL_TYPES[t][2]
    r = np.exp(np.random.default_rng([0xCE11, t]).normal(0.0, 0.12, size=2))
    return float(r[0]), float(r[1])


@lru_cache(maxsize=256)
def batch_effects(seed: int, num_experiments: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(gain, offset), each (E, C) float32: image = gain * clean + offset (fractions of full scale)."""
    gains, offsets = [], []
    for e in range(num_experiments):
        rng = np.random.default_rng([seed, 0xBA7C, e])
        gains.append(np.exp(rng.normal(0.0, 0.12, size=channels)))
        offsets.append(rng.uniform(0.0, 0.06, size=channels))
    return np.asarray(gains, np.float32), np.asarray(offsets, np.float32)


def describe_effects(spec: SyntheticSpec) -> dict[str, Any]:
    """The ground-truth table: per perturbation its factors, per experiment its gain/offset, per cell type its sizes.

    ``perturbations[name]`` has kind (primary effect), direction (+1/-1), nucleus_size, elongation, cytoplasm_size,
    texture (multipliers) and intensity (dict channel -> multiplier), target_channel (for kind == "intensity"),
    smiles and, in compound mode, per-dose factors under ``doses``.
    """
    chans = channel_names(spec.channels)
    perts: dict[str, Any] = {}
    for k, name in enumerate(perturbation_names(spec)):
        f = perturbation_factors(k, spec.channels)
        row = {**f, "intensity": dict(zip(chans, f["intensity"])),
               "target_channel": None if f["target_channel"] is None else chans[f["target_channel"]],
               "smiles": _smiles(spec, k)}
        if spec.compounds and k > 0:
            row["doses"] = {str(d): {kk: (dict(zip(chans, v)) if kk == "intensity" else v)
                                     for kk, v in perturbation_factors(k, spec.channels, d, True).items()
                                     if kk in ("nucleus_size", "elongation", "cytoplasm_size", "texture", "intensity")}
                            for d in DOSES}
        perts[name] = row
    gain, offset = batch_effects(spec.seed, spec.num_experiments, spec.channels)
    exps = {n: {"gain": dict(zip(chans, map(float, gain[e]))), "offset": dict(zip(chans, map(float, offset[e])))}
            for e, n in enumerate(experiment_names(spec))}
    cells = {n: dict(zip(("nucleus_size", "cytoplasm_size"), cell_type_factors(t)))
             for t, n in enumerate(cell_type_names(spec))}
    return {"channels": chans, "perturbations": perts, "experiments": exps, "cell_types": cells}


def effects_markdown(spec: SyntheticSpec) -> str:
    """describe_effects as a Markdown table (for reports and docs)."""
    d = describe_effects(spec)
    lines = ["| perturbation | primary effect | nucleus | elongation | cytoplasm | texture | intensity |",
             "|---|---|---|---|---|---|---|"]
    for name, r in d["perturbations"].items():
        inten = ", ".join(f"{c} x{v:.2f}" for c, v in r["intensity"].items() if abs(v - 1) > 0.1) or "-"
        prim = r["kind"] + ("" if r["direction"] == 0 else (" up" if r["direction"] > 0 else " down"))
        lines.append(f"| {name} | {prim} | x{r['nucleus_size']:.2f} | x{r['elongation']:.2f} | "
                     f"x{r['cytoplasm_size']:.2f} | x{r['texture']:.2f} | {inten} |")
    return "\n".join(lines)


def _smiles(spec: SyntheticSpec, k: int) -> str | None:
    if not spec.compounds:
        return None
    return CONTROL_SMILES if k == 0 else COMPOUNDS[k - 1][1]


# ----------------------------------------------------------------------------------------------------------
# Labels of sample i (a pure function of i).


def labels_of(spec: SyntheticSpec, i: int) -> tuple[int, int, int, float]:
    """(perturbation k, experiment e, cell type t, dose) of sample index i."""
    E, P1, T = spec.num_experiments, spec.num_perturbations + 1, spec.num_cell_types
    e, k, t = i % E, (i // E) % P1, (i // (E * P1)) % T
    dose = float(DOSES[(i // (E * P1 * T)) % len(DOSES)]) if (spec.compounds and k > 0) else 0.0
    return k, e, t, dose


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode())


# ----------------------------------------------------------------------------------------------------------
# Rendering.


@lru_cache(maxsize=32)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear interpolation weights from a grid of `grid` nodes to `size` pixel centres."""
    pos = np.clip((np.arange(size) + 0.5) / size * grid - 0.5, 0, grid - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, grid - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((size, grid), np.float32)
    m[np.arange(size), lo] += 1 - w
    m[np.arange(size), hi] += w
    return m


MAX_CELLS = 4


def _draw_params(spec: SyntheticSpec, split: str, i: int, g1: int, g2: int) -> dict[str, Any]:
    """Everything random about sample i, from its own generator."""
    S, C = spec.image_size, spec.channels
    rng = np.random.default_rng([spec.seed, _split_code(split), i])
    k, e, t, dose = labels_of(spec, i)
    pf = perturbation_factors(k, C, dose, spec.compounds)
    nuc_t, cyt_t = cell_type_factors(t)
    n_cells = int(rng.integers(2, MAX_CELLS + 1))
    centre = rng.normal(0.5, 0.07, size=(1, 2))
    others = rng.uniform(0.08, 0.92, size=(MAX_CELLS - 1, 2))
    xy = np.concatenate([centre, others]) * S
    radius = 0.095 * S * nuc_t * pf["nucleus_size"] * np.exp(rng.normal(0, 0.1, MAX_CELLS))
    aspect = np.maximum(1.25 * pf["elongation"] * np.exp(rng.normal(0, 0.1, MAX_CELLS)), 1.0)
    cyto = 2.0 * cyt_t * pf["cytoplasm_size"] * np.exp(rng.normal(0, 0.08, MAX_CELLS))
    return {
        "k": k, "e": e, "t": t, "dose": dose, "pf": pf,
        "xy": xy, "a": radius * np.sqrt(aspect), "b": radius / np.sqrt(aspect), "cyto": cyto,
        "angle": rng.uniform(0, np.pi, MAX_CELLS),
        "active": (np.arange(MAX_CELLS) < n_cells).astype(np.float32),
        "bright": np.exp(rng.normal(0, 0.1, MAX_CELLS)),
        "coarse": rng.standard_normal((C + 1, g1, g1), dtype=np.float32),
        "fine": rng.standard_normal((C, g2, g2), dtype=np.float32),
        "pixel": rng.random((S, S, C), dtype=np.float32),
    }


def _render(spec: SyntheticSpec, ps: list[dict[str, Any]]) -> np.ndarray:
    """Render a list of drawn parameter sets into (B, H, W, C) uint8 images, vectorised over B and cells."""
    S, C = spec.image_size, spec.channels
    st = {key: np.stack([p[key] for p in ps]).astype(np.float32)
          for key in ("xy", "a", "b", "cyto", "angle", "active", "bright", "coarse", "fine", "pixel")}
    g1, g2 = st["coarse"].shape[-1], st["fine"].shape[-1]
    # Smooth noise fields: bilinear upsampling as two matrix products, (B, C, g, g) -> (B, C, S, S).
    U1, U2 = _upsample_matrix(S, g1), _upsample_matrix(S, g2)
    coarse = np.einsum("hi,bcij,wj->bchw", U1, st["coarse"], U1, optimize=True)
    fine = np.einsum("hi,bcij,wj->bchw", U2, st["fine"], U2, optimize=True)
    # Per-cell geometry, (B, K, S, S): rotate pixel offsets into each nucleus' frame.
    grid = np.arange(S, dtype=np.float32) + 0.5
    dx = grid[None, None, None, :] - st["xy"][:, :, 0, None, None]
    dy = grid[None, None, :, None] - st["xy"][:, :, 1, None, None]
    cos, sin = np.cos(st["angle"])[..., None, None], np.sin(st["angle"])[..., None, None]
    a, b = st["a"][..., None, None], st["b"][..., None, None]
    u, v = (dx * cos + dy * sin) / a, (dy * cos - dx * sin) / b
    dn = np.sqrt(u * u + v * v)  # elliptical distance: 1 on the nuclear boundary
    # Nucleus: a soft mask whose edge ramp is about one pixel wide.
    nuc = np.clip(0.5 + (1 - dn) * b, 0, 1) * st["active"][..., None, None]
    # Cytoplasm: the nuclear ellipse scaled by `cyto`, its edge wobbled by a smooth noise field.
    cf = st["cyto"][..., None, None]
    dc = dn / cf * (1 + 0.12 * coarse[:, None, C])
    edge = (1 - dc) * b * cf  # ~ signed distance to the cell edge in pixels
    act = st["active"][..., None, None]
    cyt = np.clip(0.5 + edge, 0, 1) * act
    ring = np.clip(1 - np.abs(edge) / 1.5, 0, 1) * act
    perin = np.exp(-1.5 * np.maximum(dn - 1, 0)) * cyt  # perinuclear density, decays away from the nucleus
    nucleus = (nuc * st["bright"][..., None, None]).max(1)
    nuc_mask, cyto_mask = nuc.max(1), cyt.max(1)
    ring, perin = ring.max(1), perin.max(1)
    cyto_only = np.clip(cyto_mask - nuc_mask, 0, 1)
    # Per-sample perturbation factors.
    inten = np.asarray([p["pf"]["intensity"] for p in ps], np.float32)  # (B, C)
    tex_f = np.asarray([p["pf"]["texture"] for p in ps], np.float32)[:, None, None, None]
    # Multiplicative texture per channel: 1 + amplitude * (coarse + fine noise).
    amp = np.asarray([0.25, 0.3, 0.3, 0.25, 0.35, 0.3][:C], np.float32)[None, :, None, None]
    tex = np.maximum(1 + amp * tex_f * (0.5 * coarse[:, :C] + 0.8 * fine), 0)
    if C == 6:
        nucleoli = nuc_mask * np.clip(fine[:, 3] - 0.6, 0, 1.5)
        stains = [0.85 * nucleus,
                  0.6 * cyto_only * (0.3 + 0.7 * perin),
                  0.2 * cyto_only + 0.75 * ring * cyto_mask,
                  0.15 * cyto_only + 0.3 * nuc_mask + 0.6 * nucleoli,
                  0.65 * cyto_only * (0.2 + 0.8 * perin) * np.clip(0.3 + fine[:, 4], 0, 2),
                  0.45 * ring * cyto_mask + 0.5 * cyto_only * perin ** 3]
    else:
        stains = [0.85 * nucleus, 0.6 * cyto_only * (0.4 + 0.6 * perin), 0.2 * cyto_only + 0.75 * ring * cyto_mask]
    clean = np.stack(stains, 1) * tex * inten[:, :, None, None]  # (B, C, S, S)
    # Batch effects of each sample's experiment, then sensor noise (+-1 grey level), quantise to uint8.
    gain, offset = batch_effects(spec.seed, spec.num_experiments, C)
    e = np.asarray([p["e"] for p in ps])
    img = clean.transpose(0, 2, 3, 1) * gain[e][:, None, None, :] + offset[e][:, None, None, :]
    img = img * 255.0 + st["pixel"] * 2.0 - 0.5
    return np.clip(img, 0, 255).astype(np.uint8)


def _meta(spec: SyntheticSpec, split: str, i: int, p: dict[str, Any]) -> dict[str, Any]:
    k = p["k"]
    return {"key": f"{split}_{i:08d}", "perturbation": perturbation_names(spec)[k],
            "experiment": experiment_names(spec)[p["e"]], "cell_type": cell_type_names(spec)[p["t"]],
            "dose": p["dose"], "smiles": _smiles(spec, k), "is_control": k == 0, "split": split, "index": i}


def iter_synthetic(spec: SyntheticSpec, n: int, split: str, start_index: int = 0,
                   chunk: int = 64) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """Yield (images (b, H, W, C) uint8, metadata) chunks covering indices start_index .. start_index + n - 1."""
    S = spec.image_size
    g1, g2 = 5, max(4, S // 4)
    for lo in range(start_index, start_index + n, chunk):
        idx = range(lo, min(lo + chunk, start_index + n))
        ps = [_draw_params(spec, split, i, g1, g2) for i in idx]
        yield _render(spec, ps), [_meta(spec, split, i, p) for i, p in zip(idx, ps)]


def generate_synthetic(spec: SyntheticSpec, n: int, split: str = "train",
                       start_index: int = 0) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """n images (n, H, W, C) uint8 with metadata dicts, samples start_index .. start_index + n - 1 of `split`.

    Metadata keys: key, perturbation, experiment, cell_type, dose, smiles, is_control, split, index.
    """
    if n < 0:
        raise ValueError(f"generate_synthetic: n={n} must be >= 0")
    S, C = spec.image_size, spec.channels
    images, meta = np.empty((n, S, S, C), np.uint8), []
    pos = 0
    for imgs, m in iter_synthetic(spec, n, split, start_index):
        images[pos:pos + len(imgs)] = imgs
        meta.extend(m)
        pos += len(imgs)
    return images, meta
