"""Expression sampling: a run's export -> predicted cells for an evaluation split, written as h5ad pairs that
`evaluate_expression` and cell-eval read (`cell-eval run -ap pred.h5ad -ar real.h5ad --profile vcc
--pert-col condition --control-pert control`).

For every (perturbation label, covariate values, dataset) group of the split's real perturbed cells, as many
cells as the real group holds are generated from N(0, I) noise by solving the flow ODE t: 0 -> 1 (eval.solver,
eval.steps, eval.rtol/atol) with classifier-free guidance w over eval.guidance_groups (phenoflow.flow.guidance);
the i-th generated cell of a group carries the labels (and dose) of the group's i-th real cell. The noise of a
group comes from one generator seeded by a hash of (seed, label, covariates), so a group's cells do not depend on
the batch size or on which other groups are generated. A model trained control -> perturbed
(flow.coupling=control) starts instead from real control cells of the same covariates and dataset (the
split's own, else the training split's) plus flow.control_noise times that noise, as it was trained.

Files (same genes in the same order: the manifest's `genes`; obs columns: the perturbation column with the
original label string such as "A+B", each covariate, the dataset and the dose column; `.X` float32 log1p, dense):
  real_<split>.h5ad   every real cell of the split (controls and perturbed), read back from the shards;
  pred_w<w>.h5ad      the split's REAL control cells followed by the generated cells (PerturBench and cell-eval
                      both expect the real controls in the prediction file).
Clamp: generated values are clipped to [0, max of the training split's log1p values] (PRiMeFlow clips to
[0, 12] in log1p space; the data's own maximum is the tighter bound that still allows every observed value).
The maximum is computed once per data folder and cached in run_dir/eval_cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phenoflow.config import Config, ConfigError, from_dict

log = logging.getLogger("phenoflow.eval")
PRIMEFLOW_CLAMP = 12.0  # fallback upper bound (log1p) when the data has no training split to read


# ---- the run's model and data ---------------------------------------------------------------------------------
def load_expression_export(run_dir: str | Path, ema_std: float | None = None) -> tuple[torch.nn.Module, Config, dict]:
    """(model with the exported weights, the run's resolved config, the export's manifest) from run_dir/export."""
    from phenoflow.modalities import get_modality
    from phenoflow.train.checkpoint import (
        export_weights,
        load_safetensors,
        load_weights,
    )

    export = Path(run_dir) if (Path(run_dir) / "model.json").is_file() else Path(run_dir) / "export"  # or an export
    meta_path, man_path = export / "model.json", export / "manifest.json"
    for p in (meta_path, man_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist: train the run first (phenoflow train ...)")
    meta = json.loads(meta_path.read_text())
    cfg = from_dict(meta.get("config", meta))
    if cfg.data.modality != "expression":
        raise ConfigError(f"{meta_path}: the run is a {cfg.data.modality!r} run, not an expression run")
    manifest = json.loads(man_path.read_text())
    vocab_sizes = {k: int(v) for k, v in meta.get("vocab_sizes", {}).items()}
    std = cfg.eval.ema_std if ema_std is None else ema_std
    wfile = export_weights(export, std)
    model = get_modality(cfg).build_model(cfg, vocab_sizes, manifest)
    state = load_safetensors(wfile)
    buffers = {k for k, _ in model.named_buffers()} - set(model.state_dict())
    load_weights(model, {k: v for k, v in state.items() if k not in buffers}, wfile, built_from=str(meta_path))
    return model.eval(), cfg, manifest


def data_folder(cfg: Config, run_dir: Path, data_dir: str | Path | None = None) -> Path:
    """The shard folder to evaluate on: given; else the run's own run_dir/data; else prepared from cfg."""
    if data_dir is not None:
        return Path(data_dir)
    if cfg.data.source != "shards" and (run_dir / "data" / "manifest.json").is_file():
        return run_dir / "data"
    from phenoflow.modalities import get_modality

    return get_modality(cfg).prepare_data(cfg)


@dataclass
class SplitCells:
    """The real cells of one split, sorted by key: x (N, G) float32 log1p, obs (pandas, the h5ad columns),
    labels {group: tensor} as the model takes them, and the column names."""
    x: np.ndarray
    obs: Any
    labels: dict[str, torch.Tensor]
    is_control: np.ndarray
    genes: list[str]
    pert_col: str
    control: str
    covariates: list[str]
    dataset_col: str
    dose_col: str


def read_split(data_dir: str | Path, split: str, batch_size: int = 1024, checksums: str = "first_pass") -> SplitCells:
    """Every cell of `split` from an expression shard folder, with its original label strings (label tables)."""
    import pandas as pd

    from phenoflow.data.loader import ShardLoader
    from phenoflow.data.shards import load_manifest
    from phenoflow.data.tables import read_label_table

    data_dir = Path(data_dir)
    m = load_manifest(data_dir)
    if m.get("modality") != "expression":
        raise ConfigError(f"{data_dir}: not an expression shard folder")
    if not m["splits"].get(split, {}).get("count"):
        have = sorted(s for s, v in m["splits"].items() if v.get("count"))
        raise ConfigError(f"eval.split={split!r} has no cells in {data_dir} (splits with cells: {have})")
    cols = m["columns"]
    covs = list(m.get("covariates", cols.get("covariates", [])))
    names = ["key", "perturbation", *covs, "dataset", "dose", "is_control"]
    table: dict[str, list] = {n: [] for n in names}
    for rec in m["splits"][split]["shards"]:
        t = read_label_table(data_dir / rec["labels"], rec["count"], names=names)
        for n in names:
            table[n] += t[n]
    row_of = {k: i for i, k in enumerate(table["key"])}
    loader = ShardLoader(data_dir, split, batch_size, shuffle=False, drop_last=False, infinite=False, seed=0,
                         checksums=checksums)
    xs, keys, lab = [], [], {}
    for b in loader:
        xs.append(b["x"].numpy())
        keys += list(b["key"])
        for g, v in b.items():
            if torch.is_tensor(v) and g not in ("x", "is_control"):
                lab.setdefault(g, []).append(v)
    order = np.argsort(np.asarray(keys))
    x = np.concatenate(xs)[order].astype(np.float32)
    labels = {g: torch.cat(v)[torch.from_numpy(order)] for g, v in lab.items()}
    rows = [row_of[keys[i]] for i in order]
    pert_col, dataset_col, dose_col = cols["perturbation"], cols.get("dataset") or "dataset", cols.get("dose") or "dose"
    obs = pd.DataFrame({pert_col: [str(table["perturbation"][r]) for r in rows]},
                       index=pd.Index([keys[i] for i in order], name="cell"))
    for c in covs:
        obs[c] = [str(table[c][r]) for r in rows]
    obs[dataset_col] = [str(table["dataset"][r]) for r in rows]
    obs[dose_col] = np.asarray([float(table["dose"][r] or 0.0) for r in rows], np.float64)
    ctrl = np.asarray([bool(table["is_control"][r]) for r in rows])
    return SplitCells(x, obs, labels, ctrl, list(m["genes"]), pert_col, cols["control"], covs, dataset_col, dose_col)


def train_max(data_dir: Path, cache_dir: Path | None = None) -> float:
    """The largest log1p value of the training split (the clamp's upper bound), cached per manifest."""
    from phenoflow.data.shards import load_manifest

    h = hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()[:16]
    cache = Path(cache_dir) / f"expression_max_{h}.json" if cache_dir else None
    if cache and cache.is_file():
        return float(json.loads(cache.read_text())["max"])
    if not load_manifest(data_dir)["splits"].get("train", {}).get("count"):
        return PRIMEFLOW_CLAMP
    from phenoflow.data.loader import ShardLoader

    hi = 0.0
    for b in ShardLoader(data_dir, "train", 4096, shuffle=False, drop_last=False, infinite=False, seed=0):
        hi = max(hi, float(b["x"].max()))
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"max": hi, "data_dir": str(data_dir)}))
    return hi


# ---- generation ----------------------------------------------------------------------------------------------
def group_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def perturbed_groups(cells: SplitCells) -> dict[tuple[str, ...], np.ndarray]:
    """(label, covariate values..., dataset) -> row indices of the split's real perturbed cells, sorted."""
    cols = [cells.pert_col, *cells.covariates, cells.dataset_col]
    obs = cells.obs[~cells.is_control]
    idx = np.flatnonzero(~cells.is_control)
    out: dict[tuple[str, ...], list[int]] = {}
    for i, vals in zip(idx.tolist(), zip(*(obs[c].astype(str) for c in cols))):
        out.setdefault(tuple(vals), []).append(i)
    return {k: np.asarray(v) for k, v in sorted(out.items())}


def condition_key(cells: SplitCells, i: int) -> tuple[str, ...]:
    """A cell's control group: its covariates and source dataset (the pool key of flow.coupling=control)."""
    return tuple(str(cells.obs[c].iat[i]) for c in (*cells.covariates, cells.dataset_col))


def control_sources(cells: SplitCells, fallback: SplitCells | None = None) -> dict[tuple[str, ...], np.ndarray]:
    """Control cells per condition group for control -> perturbed sampling: the evaluation split's own controls
    (PerturBench's matched controls), and for a group the split lacks, the fallback split's (the training
    split's, the pool the model learned from). A perturbed group with neither is an error naming it."""
    out: dict[tuple[str, ...], list[int]] = {}
    for i in np.flatnonzero(cells.is_control).tolist():
        out.setdefault(condition_key(cells, i), []).append(i)
    pools = {k: cells.x[np.asarray(v)] for k, v in out.items()}
    need = {condition_key(cells, i) for i in np.flatnonzero(~cells.is_control).tolist()} - set(pools)
    if need and fallback is not None:
        extra = control_sources(fallback) if fallback.is_control.any() else {}
        for k in sorted(need & set(extra)):
            log.info("control source for %s: no control cells in the evaluation split, using the training split's "
                     "(%d cells)", "/".join(k), len(extra[k]))
            pools[k] = extra[k]
        need -= set(extra)
    if need:
        raise ConfigError("flow.coupling=control: no control cells to start from for condition group(s) "
                          f"{sorted('/'.join(k) for k in need)} (covariates {cells.covariates} + dataset) in the "
                          "evaluation or training split")
    return pools


@torch.no_grad()
def generate_split(model: torch.nn.Module, cells: SplitCells, eval_cfg: Any, w: float, seed: int = 0,
                   device: str | torch.device = "cpu", upper: float = PRIMEFLOW_CLAMP,
                   sources: dict[tuple[str, ...], np.ndarray] | None = None,
                   control_noise: float = 0.0,
                   unmeasured: dict[str, list[int]] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Generated cells for every perturbed group of `cells` -> (x (n, G) float32 clamped to [0, upper], the real
    row each generated cell copies its labels from, mean NFE per solver call).

    The ODE starts from x0 ~ N(0, I) (noise -> expression, the default flow) or, with `sources` (a model trained
    with flow.coupling=control), from x0 = c + control_noise * z, c drawn uniformly with replacement from the
    control cells of the group's covariates and dataset, as in training (phenoflow/train/control_pool.py).
    `unmeasured` (an atlas on the union of genes: {dataset: gene positions it does not measure}): those genes of
    the group's dataset are written as 0, as the data stores them (the model was never trained on them)."""
    from phenoflow.flow.guidance import make_velocity_fn
    from phenoflow.flow.solvers import integrate

    device = torch.device(device)
    model = model.to(device).eval()
    solve = {"method": eval_cfg.solver, "rtol": eval_cfg.rtol, "atol": eval_cfg.atol, "steps": eval_cfg.steps}
    groups = tuple(eval_cfg.guidance_groups)
    bs = max(1, int(eval_cfg.batch_size))
    xs, src, nfes = [], [], []
    genes = cells.x.shape[1]
    for key, rows in perturbed_groups(cells).items():
        g = torch.Generator().manual_seed(group_seed(seed, "|".join(key)))
        noise = torch.randn(len(rows), genes, generator=g)
        if sources is not None:
            pool = torch.from_numpy(sources[condition_key(cells, int(rows[0]))])
            pick = torch.randint(len(pool), (len(rows),), generator=g)
            noise = pool[pick] + control_noise * noise
        for a in range(0, len(rows), bs):
            r = torch.from_numpy(rows[a:a + bs])
            labels = {k: v[r].to(device) for k, v in cells.labels.items()}
            x1, nfe = integrate(make_velocity_fn(model, labels, w, groups), noise[a:a + bs].to(device), 0.0, 1.0,
                                **solve)
            x1 = x1.float().clamp(0.0, upper).cpu()
            if unmeasured and unmeasured.get(key[-1]):
                x1[:, torch.as_tensor(unmeasured[key[-1]], dtype=torch.long)] = 0.0
            xs.append(x1.numpy())
            nfes.append(nfe)
        src.append(rows)
    if not xs:
        raise ConfigError("the evaluation split has no perturbed cells to generate (only controls); "
                          "choose another eval.split")
    return np.concatenate(xs).astype(np.float32), np.concatenate(src), float(np.mean(nfes))


def to_anndata(x: np.ndarray, obs: Any, genes: list[str], uns: dict | None = None):
    import anndata
    import pandas as pd

    obs = obs.copy()
    obs.index = obs.index.astype(str)
    ad = anndata.AnnData(X=np.asarray(x, np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    if uns:
        ad.uns["phenoflow"] = uns
    return ad


def prediction_anndata(cells: SplitCells, x_gen: np.ndarray, src: np.ndarray, uns: dict | None = None):
    """The split's real control cells followed by the generated cells (obs copied from their source rows)."""
    import pandas as pd

    ctrl = np.flatnonzero(cells.is_control)
    gen_obs = cells.obs.iloc[src].copy()
    gen_obs.index = pd.Index([f"gen{i:07d}" for i in range(len(src))], name="cell")
    obs = pd.concat([cells.obs.iloc[ctrl], gen_obs])
    return to_anndata(np.concatenate([cells.x[ctrl], x_gen]), obs, cells.genes, uns)


def _device(cfg: Config) -> torch.device:
    use_cuda = torch.cuda.is_available() if cfg.train.device == "auto" else cfg.train.device == "cuda"
    return torch.device("cuda" if use_cuda else "cpu")


def sample_expression(cfg: Config, run_dir: str | Path | None = None, out_dir: str | Path | None = None,
                      seed: int = 0, data_dir: str | Path | None = None, mode: str = "generate",
                      model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Write real_<split>.h5ad and pred_w<w>.h5ad for every w in cfg.eval.guidance into out_dir (default
    run_dir/samples). Returns {"real": path, "pred": {w: path}, "nfe": {w: nfe}, "seconds": {w: s}, ...}."""
    if mode != "generate":
        raise ConfigError(f"--mode {mode}: expression runs sample from noise only (--mode generate)")
    run_dir = Path(run_dir or cfg.run_dir)
    out_dir = Path(out_dir or run_dir / "samples")
    manifest = None
    if model is None:
        model, _, manifest = load_expression_export(run_dir, cfg.eval.ema_std)
    data = data_folder(cfg, run_dir, data_dir)
    cells = read_split(data, cfg.eval.split, checksums=cfg.data.checksums)
    if manifest is not None and list(manifest["genes"]) != cells.genes:
        raise ConfigError(f"{data}: its genes differ from the ones the model in {run_dir}/export was trained on")
    if manifest is not None:  # label ids by name: reordered/subset vocabularies mapped, unknown names refused
        from phenoflow.data.shards import load_manifest
        from phenoflow.run_config import apply_remap, label_remap

        vocabs = {g: list(v) for g, v in manifest.get("vocabs", {}).items()}
        cells.labels = apply_remap(cells.labels, label_remap(vocabs, load_manifest(data)["vocabs"], f"the data in {data}"))
    if cells.is_control.all():
        raise ConfigError(f"eval.split={cfg.eval.split!r} of {data} holds only control cells: nothing to generate "
                          "(choose a split with perturbed cells, e.g. eval.split=test)")
    upper = train_max(data, run_dir / "eval_cache")
    out_dir.mkdir(parents=True, exist_ok=True)
    real_path = out_dir / f"real_{cfg.eval.split}.h5ad"
    to_anndata(cells.x, cells.obs, cells.genes, {"split": cfg.eval.split, "data_dir": str(data)}).write_h5ad(real_path)
    out: dict[str, Any] = {"real": real_path, "pred": {}, "nfe": {}, "seconds": {}, "clamp": [0.0, upper],
                           "split": cfg.eval.split, "cells": cells, "data_dir": data}
    from phenoflow.data.shards import load_manifest

    unmeasured = load_manifest(data).get("unmeasured_genes")
    dev = _device(cfg)
    sources = None
    if cfg.flow.coupling == "control":
        train = read_split(data, "train", checksums=cfg.data.checksums) if cfg.eval.split != "train" else None
        sources = control_sources(cells, train)
        out["source"] = f"control cells of the same covariates and dataset + N(0, {cfg.flow.control_noise:g}^2) noise"
    for w in cfg.eval.guidance:
        t0 = time.perf_counter()
        x_gen, src, nfe = generate_split(model, cells, cfg.eval, w, seed=seed, device=dev, upper=upper,
                                         sources=sources, control_noise=cfg.flow.control_noise,
                                         unmeasured=unmeasured)
        secs = time.perf_counter() - t0
        uns = {"w": float(w), "nfe": nfe, "coupling": cfg.flow.coupling, "solver": cfg.eval.solver, "steps": cfg.eval.steps, "seed": seed,
               "clamp_max": upper, "split": cfg.eval.split, "ema_std": cfg.eval.ema_std}
        path = out_dir / f"pred_w{w:g}.h5ad"
        prediction_anndata(cells, x_gen, src, uns).write_h5ad(path)
        out["pred"][w], out["nfe"][w], out["seconds"][w] = path, nfe, secs
        log.info("w=%g: %d cells generated (NFE %.0f, %.1fs) -> %s", w, len(src), nfe, secs, path)
    return out
