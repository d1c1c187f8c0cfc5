"""PerturBench's split tasks for expression data, seeded, written to a CSV beside the data.

Checked against PerturBench's splitter (altoslabs/perturbench, src/perturbench/data/datasplitter.py at
d357dfa; configs data/splitter/*.yaml); this is our own code with the same task definitions and defaults:

- ``combine``: per covariate value (e.g. each cell type), hold out ``int(0.3 * #combinations)`` (at most 200)
  of its ``A+B`` combinations. Single perturbations stay in training.
- ``combine_inverse``: per covariate value, hold out ``int(0.3 * #singles)`` (at most 200) single
  perturbations; once a single is held out, the other components of its combinations leave the pool, so each
  held-out single keeps a training combination with a partner seen alone. Combinations stay in training.
- ``transfer``: each perturbation measured in more than ``min_train_covariates`` (1) covariate values is held
  out in 1 .. ``max_heldout_covariates`` (1) of them, visiting perturbations by descending number of covariate
  values, then name; a covariate value holds out fewer than ``0.3 * #labels`` (at most 200) perturbations.
- Held-out (perturbation, covariate value) pairs: per covariate value, half val and half test (``test_fraction``
  0.5; the odd one goes to test). Control cells: ``train_control_fraction`` (0.5) to train, the rest split
  evenly between val and test, so every split has real control cells for evaluation (PerturBench's metrics
  compare against the controls of the evaluated split). Default seed 42, as PerturBench's task configs.

Departures from PerturBench, on purpose: randomness is a numpy Generator keyed by (seed, crc32 of the
covariate value), so adding a cell type does not reshuffle the others; controls are split per covariate value
(PerturBench splits the pooled controls, which can leave a cell type without val/test controls); a covariate
value with a single held-out pair sends it to test (PerturBench leaves such cells in no split); the control
label is never a held-out "single" in ``combine_inverse``; in ``transfer`` a perturbation always keeps at
least ``min_train_covariates`` training covariate values.

CSV: one row per cell, ``cell_id,split``, no header: the layout PerturBench reads back
(``pd.read_csv(path, index_col=0, header=None)``); a header row is accepted when reading. The parameters, counts
and a sha256 of the cell ids go to ``<csv>.json`` beside it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .anndata_io import ExpressionColumns
from .errors import DataError

SPLITS = ("train", "val", "test")
Task = Literal["transfer", "combine", "combine_inverse"]


@dataclass(frozen=True)
class SplitSpec:
    task: Task = "combine"
    seed: int = 42
    heldout_fraction: float = 0.3          # per covariate value
    max_heldout_per_covariate: int = 200
    train_control_fraction: float = 0.5
    test_fraction: float = 0.5             # of the held-out pairs of a covariate value
    min_train_covariates: int = 1          # transfer
    max_heldout_covariates: int = 1        # transfer

    def __post_init__(self):
        if self.task not in ("transfer", "combine", "combine_inverse"):
            raise DataError(f"split task must be transfer, combine or combine_inverse, not {self.task!r}")
        for name in ("heldout_fraction", "train_control_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise DataError(f"split {name} must be in [0, 1], not {v!r}")


@dataclass
class SplitResult:
    split: Any                                   # pd.Series: obs_names -> "train" | "val" | "test"
    heldout: dict[tuple[str, tuple[str, ...]], str]  # (perturbation, covariate values) -> "val" | "test"
    spec: SplitSpec

    def counts(self) -> dict[str, int]:
        vc = self.split.value_counts()
        return {s: int(vc.get(s, 0)) for s in SPLITS}

    def perturbations(self, split: str) -> list[str]:
        return sorted({p for (p, _), s in self.heldout.items() if s == split})


def _rng(seed: int, key: tuple[str, ...], salt: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("\x1f".join((salt, *key)).encode())])


def _heldout_combine(groups, cols, spec, inverse: bool) -> dict[tuple[str, ...], list[str]]:
    out = {}
    for key, labels in groups.items():
        rng = _rng(spec.seed, key, "combine_inverse" if inverse else "combine")
        combos = sorted(x for x in labels if cols.is_combination(x))
        if not inverse:
            n = min(int(spec.heldout_fraction * len(combos)), spec.max_heldout_per_covariate)
            out[key] = sorted(rng.choice(combos, size=n, replace=False).tolist()) if n else []
            continue
        singles = sorted(x for x in labels if x != cols.control and not cols.is_combination(x))
        partners = defaultdict(set)
        for c in combos:
            parts = cols.components(c)
            for p in parts:
                partners[p].update(q for q in parts if q != p)
        n = min(int(spec.heldout_fraction * len(singles)), spec.max_heldout_per_covariate)
        pool = [singles[i] for i in rng.permutation(len(singles))]
        held: list[str] = []
        while len(held) < n and pool:
            s = pool.pop(0)
            held.append(s)
            pool = [x for x in pool if x not in partners[s]]
        out[key] = sorted(held)
    return out


def _heldout_transfer(groups, cols, spec) -> dict[tuple[str, ...], list[str]]:
    cap = {k: min(spec.heldout_fraction * len(v), spec.max_heldout_per_covariate) for k, v in groups.items()}
    covs_of = defaultdict(list)
    for key in sorted(groups):
        for lab in groups[key]:
            if lab != cols.control:
                covs_of[lab].append(key)
    order = sorted(covs_of, key=lambda p: (-len(covs_of[p]), p))
    rng = _rng(spec.seed, (), "transfer")
    n_held: dict[tuple[str, ...], int] = defaultdict(int)
    out: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for pert in order:
        covs = covs_of[pert]
        pool = [c for c in covs if n_held[c] < cap[c]]
        k_max = min(spec.max_heldout_covariates, len(covs) - spec.min_train_covariates, len(pool))
        if k_max < 1:
            continue
        k = int(rng.integers(1, k_max + 1))
        for i in sorted(rng.choice(len(pool), size=k, replace=False).tolist()):
            n_held[pool[i]] += 1
            out[pool[i]].append(pert)
    return {k: sorted(v) for k, v in out.items()}


def split_cells(obs: Any, cols: ExpressionColumns | None = None, spec: SplitSpec | None = None,
                file: str = "<obs>") -> SplitResult:
    """Assign every cell of an obs table to train / val / test (module docstring)."""
    import pandas as pd

    cols, spec = cols or ExpressionColumns(), spec or SplitSpec()
    for c in (cols.perturbation, *cols.covariates):
        if c not in obs.columns:
            raise DataError(f"{file}: obs column {c!r} not found; obs columns present: {list(obs.columns)}")
    pert = obs[cols.perturbation].astype(str).to_numpy()
    keys = [tuple(r) for r in obs[list(cols.covariates)].astype(str).to_numpy()] if cols.covariates else \
        [()] * len(obs)
    groups: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for p, k in zip(pert, keys):
        groups[k].add(p)
    if not (pert == cols.control).any():
        raise DataError(f"{file}: column {cols.perturbation!r} has no control cells (label {cols.control!r})")
    if spec.task == "transfer":
        held = _heldout_transfer(groups, cols, spec)
    else:
        held = _heldout_combine(groups, cols, spec, inverse=spec.task == "combine_inverse")
    heldout: dict[tuple[str, tuple[str, ...]], str] = {}
    for key in sorted(held):
        labs = held[key]
        if not labs:
            continue
        rng = _rng(spec.seed, key, "val_test")
        shuffled = [labs[i] for i in rng.permutation(len(labs))]
        n_val = int(np.floor(len(labs) * (1.0 - spec.test_fraction)))
        for i, lab in enumerate(shuffled):
            heldout[(lab, key)] = "val" if i < n_val else "test"
    split = np.array(["train"] * len(obs), dtype=object)
    for i, (p, k) in enumerate(zip(pert, keys)):
        s = heldout.get((p, k))
        if s is not None:
            split[i] = s
    ctrl_by_key: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, (p, k) in enumerate(zip(pert, keys)):
        if p == cols.control:
            ctrl_by_key[k].append(i)
    for key in sorted(ctrl_by_key):
        idx = np.array(ctrl_by_key[key])[_rng(spec.seed, key, "controls").permutation(len(ctrl_by_key[key]))]
        n_train = int(spec.train_control_fraction * len(idx))
        n_val = (len(idx) - n_train) // 2
        split[idx[:n_train]] = "train"
        split[idx[n_train:n_train + n_val]] = "val"
        split[idx[n_train + n_val:]] = "test"
    return SplitResult(pd.Series(split, index=obs.index.astype(str), name="split"), heldout, spec)


def summary(result: SplitResult, obs: Any, cols: ExpressionColumns | None = None) -> Any:
    """Perturbations per (covariate values, split), as PerturBench's split summary."""
    cols = cols or ExpressionColumns()
    df = obs[[*cols.covariates, cols.perturbation]].astype(str).copy()
    df["split"] = result.split.to_numpy()
    return df.groupby([*cols.covariates, "split"])[cols.perturbation].nunique().unstack(fill_value=0)


# -- CSV ---------------------------------------------------------------------------------------------------
def default_split_path(data_path: str | Path, spec: SplitSpec) -> Path:
    p = Path(data_path)
    return p.with_name(f"{p.stem}.split_{spec.task}_seed{spec.seed}.csv")


def _ids_digest(ids) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def write_split_csv(result: SplitResult, path: str | Path) -> Path:
    """``cell_id,split`` rows (no header) plus ``<path>.json`` with the spec and counts; atomic writes."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        for cid, s in zip(result.split.index, result.split.to_numpy()):
            w.writerow([cid, s])
    tmp.replace(p)
    meta = {"format": "phenoflow-split-v1", "spec": asdict(result.spec), "counts": result.counts(),
            "n_cells": len(result.split), "cell_ids_sha256": _ids_digest(result.split.index),
            "heldout": [{"perturbation": k[0], "covariates": list(k[1]), "split": v}
                        for k, v in sorted(result.heldout.items())]}
    side = p.with_name(p.name + ".json")
    tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(side)
    return p


def read_split_csv(path: str | Path, obs_names: Any = None) -> Any:
    """Read a split CSV back as a pd.Series (cell id -> split); with ``obs_names``, check that it covers exactly
    those cells and return it in their order. Bad rows are a `DataError` naming the file, row and value."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such split file")
    ids, vals, seen = [], [], set()
    with open(p, newline="") as f:
        for row_no, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 2:
                raise DataError(f"{p}: row {row_no}: expected 2 fields (cell_id, split), got {len(row)}: {row}")
            cid, s = row[0], row[1].strip()
            if row_no == 1 and s not in SPLITS:
                continue  # a header row
            if s not in SPLITS:
                raise DataError(f"{p}: row {row_no}: column split: value {s!r} is not one of {list(SPLITS)}")
            if cid in seen:
                raise DataError(f"{p}: row {row_no}: column cell_id: duplicated cell id {cid!r}")
            seen.add(cid)
            ids.append(cid)
            vals.append(s)
    ser = pd.Series(vals, index=pd.Index(ids), name="split", dtype=object)
    if obs_names is None:
        return ser
    want = pd.Index(list(map(str, obs_names)))
    unknown = ser.index.difference(want)
    missing = want.difference(ser.index)
    if len(unknown):
        raise DataError(f"{p}: column cell_id: {len(unknown)} cell ids not in the data, e.g. {list(unknown[:5])}")
    if len(missing):
        raise DataError(f"{p}: column cell_id: {len(missing)} cells of the data have no split, "
                        f"e.g. {list(missing[:5])}")
    return ser.reindex(want)
