"""The data of an expression run: AnnData (a file, or synthetic counts with known effects) -> normalised and
log1p'd, genes selected (HVG united with measured target genes) -> PerturBench split -> expression shards in
run_dir/data, written once and reused while the recipe is unchanged.

    data.source=synthetic   counts from phenoflow/data/synthetic_counts.py (expr.synth_*; data.synth_seed)
    data.source=anndata     the file expr.h5ad (columns expr.*_col; PerturBench conventions by default)
    data.source=shards      an existing expression shard folder (phenoflow data convert anndata)

The run folder keeps what a user needs to reproduce or score the run: `split.csv` (cell id -> split, in
PerturBench's layout, with its JSON sidecar), `preprocessing.json` (the kept genes, the log-state decision and
the gene-selection method) and `recipe.json` (the config fields the data came from). The shards are the same
format as the image shards (manifest, index, label tables, checksums), so the loader's exactly-once,
resumable, multi-rank streaming serves expression unchanged.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from phenoflow.config import Config, ConfigError

from .anndata_io import ExpressionColumns

log = logging.getLogger("phenoflow.data")
RECIPE = "recipe.json"


def columns_from_config(cfg: Config) -> ExpressionColumns:
    e = cfg.expr
    return ExpressionColumns(perturbation=e.perturbation_col, control=e.control_label, separator=e.combination_sep,
                             covariates=tuple(e.covariates), dose=e.dose_col or None,
                             dataset=e.dataset_col or None, counts_layer=e.counts_layer or None)


def recipe(cfg: Config) -> dict[str, Any]:
    """The config fields the prepared data depends on (a change rewrites run_dir/data)."""
    d = cfg.data
    out = {"source": d.source, "expr": dataclasses.asdict(cfg.expr), "samples_per_shard": d.samples_per_shard}
    if d.source == "synthetic":
        out["synth_seed"] = d.synth_seed
    return out


def _source_anndata(cfg: Config, cols: ExpressionColumns):
    e = cfg.expr
    if cfg.data.source == "synthetic":
        from .synthetic_counts import generate_counts
        from .synthetic_counts_effects import CountSpec

        try:
            spec = CountSpec.for_genes(e.synth_genes, n_cell_types=e.synth_cell_types, seed=cfg.data.synth_seed)
        except ValueError as err:
            raise ConfigError(f"expr.synth_genes={e.synth_genes}, expr.synth_cell_types={e.synth_cell_types}: "
                              f"{err}") from err
        return generate_counts(spec, e.synth_cells), "synthetic counts"
    from .anndata_io import read_expression

    adata, report = read_expression(e.h5ad, cols)
    for entry in getattr(report, "entries", []):
        log.info("%s: %s", e.h5ad, entry)
    return adata, e.h5ad


def atlas_files(entries: list[str]) -> dict[str, str]:
    """expr.atlas entries -> {dataset name: path} ("name=path", or a path named by its file stem)."""
    out: dict[str, str] = {}
    for item in entries:
        name, _, path = item.partition("=") if "=" in item else (Path(item).stem, "", item)
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ConfigError(f"expr.atlas entry {item!r}: expected 'name=path.h5ad' or 'path.h5ad'")
        if name in out:
            raise ConfigError(f"expr.atlas: dataset name {name!r} given twice ({out[name]}, {path})")
        out[name] = path
    return out


def _prepared_atlas(cfg: Config, cols: ExpressionColumns):
    """Each expr.atlas file read and preprocessed alone (its own log state and HVGs united with its targets),
    then aligned on one gene axis (expr.atlas_genes) -> (AnnData, genes, {dataset: unmeasured gene indices},
    preprocessing summary)."""
    from .anndata_io import read_expression
    from .expression_prep import align_datasets, prepare_expression

    preps = {}
    for name, path in atlas_files(cfg.expr.atlas).items():
        adata, _ = read_expression(path, cols)
        prep = prepare_expression(adata, cols, n_top_genes=cfg.expr.n_top_genes, file=path)
        preps[name] = prep
    at = align_datasets({n: p.adata for n, p in preps.items()}, mode=cfg.expr.atlas_genes, cols=cols)
    unmeasured = {d: np.flatnonzero(~at.mask[i]).tolist() for i, d in enumerate(at.datasets)}
    summary = {"atlas": {n: p.to_json() for n, p in preps.items()}, "genes": at.genes, "n_genes": len(at.genes),
               "atlas_genes": at.mode, "unmeasured": {d: len(v) for d, v in unmeasured.items()},
               "dropped": at.dropped}
    return at.adata, at.genes, unmeasured, summary


def write_expression_data(cfg: Config, out: Path) -> Path:
    """AnnData -> preprocessing -> split -> shards in `out` (the manifest, written last, marks completion)."""
    from .expression_prep import prepare_expression
    from .expression_shards import convert_anndata
    from .expression_splits import SplitSpec, split_cells, write_split_csv

    cols = columns_from_config(cfg)
    if cfg.expr.atlas:
        adata, genes, unmeasured, summary = _prepared_atlas(cfg, cols)
        where = f"atlas {sorted(atlas_files(cfg.expr.atlas))}"
    else:
        adata, where = _source_anndata(cfg, cols)
        prep = prepare_expression(adata, cols, n_top_genes=cfg.expr.n_top_genes, file=str(where))
        adata, genes, unmeasured, summary = prep.adata, prep.genes, None, prep.to_json()
    split = split_cells(adata.obs, cols, SplitSpec(task=cfg.expr.split_task, seed=cfg.expr.split_seed),
                        file=str(where))
    out.mkdir(parents=True, exist_ok=True)
    write_split_csv(split, out / "split.csv")
    (out / "preprocessing.json").write_text(json.dumps(summary, indent=1, default=str))
    convert_anndata(adata, out, cols, genes=genes, splits=split.split.to_dict(),
                    samples_per_shard=cfg.data.samples_per_shard, max_combination=cfg.expr.max_combination,
                    unmeasured=unmeasured)
    (out / RECIPE).write_text(json.dumps(recipe(cfg), indent=1, sort_keys=True))
    log.info("expression data from %s: %d cells x %d genes, split %s -> %s", where, adata.n_obs,
             len(genes), split.counts(), out)
    return out


def prepare_expression_data(cfg: Config) -> Path:
    """The shard folder of an expression run (module docstring); safe to call from every rank (a file lock
    serialises the writers, and a complete folder with the same recipe is reused)."""
    from .shards import load_manifest

    if cfg.data.source == "shards":
        folder = Path(cfg.data.shards)
        if load_manifest(folder).get("modality") != "expression":
            raise ConfigError(f"data.shards={cfg.data.shards!r} is not an expression shard folder (its manifest has "
                              "no modality 'expression'; convert an AnnData file with `phenoflow data convert anndata`)")
        return folder
    out = cfg.run_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        want = recipe(cfg)
        have = json.loads((out / RECIPE).read_text()) if (out / RECIPE).is_file() else None
        if have == want and (out / "manifest.json").is_file():
            return out
        if have is not None or any(p.name != ".prepare.lock" for p in out.iterdir()):
            log.info("%s: the data recipe changed (or a write was interrupted): rewriting it", out)
            for p in out.iterdir():
                if p.name != ".prepare.lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        return write_expression_data(cfg, out)
