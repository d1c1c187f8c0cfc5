"""Reference baselines for expression predictions, scored with the same metrics as the model (report.py).

A metric value means little on its own: PerturBench and the Virtual Cell Challenge read every model against
simple baselines, and so does the report. Both baselines predict, for every perturbed (label, condition) group of
the evaluation split, as many cells as the real group holds, starting from real control cells of the group's
condition (its covariates and dataset; the split's own controls, else the training split's), drawn uniformly
with replacement from a generator seeded per group (generate.group_seed), so the file pairs with the reference
exactly as a model's prediction does:

  control    no effect: the drawn control cells themselves (a model that ignores the perturbation).
  additive   the drawn control cells shifted by the sum of their components' mean effects measured on the
             TRAINING split (PerturBench's additive baseline for combinations):
                 x_hat = c + sum_{p in components(label)} (mean_train[p, k] - mean_train[control, k])
             in log1p space, clamped to [0, upper], with k the group's condition. A component not trained in
             condition k takes the mean of its effects in the conditions where it was trained (a transfer
             split's held-out cell type); a component never trained contributes 0 (counted in `unseen`).

The prediction files are written beside the model's as pred_baseline_<name>.h5ad.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .generate import SplitCells, condition_key, group_seed, perturbed_groups

BASELINES = ("control", "additive")


def _means(cells: SplitCells, separator: str) -> tuple[dict, dict]:
    """Training split -> ({(single label, condition): mean row}, {condition: control mean row})."""
    pert = cells.obs[cells.pert_col].astype(str).to_numpy()
    conds = [condition_key(cells, i) for i in range(len(pert))]
    sums: dict[tuple[str, tuple[str, ...]], list] = {}
    for i, (p, k) in enumerate(zip(pert, conds)):
        if separator in p:  # combinations do not define a single component's effect
            continue
        key = (cells.control if cells.is_control[i] else p, k)
        acc = sums.setdefault(key, [np.zeros(cells.x.shape[1], np.float64), 0])
        acc[0] += cells.x[i]
        acc[1] += 1
    means = {key: s / n for key, (s, n) in sums.items()}
    ctrl = {k: v for (p, k), v in means.items() if p == cells.control}
    return {key: v for key, v in means.items() if key[0] != cells.control}, ctrl


def effects(train: SplitCells, separator: str = "+") -> dict[str, dict[tuple[str, ...], np.ndarray]]:
    """{single perturbation: {condition: mean_train[p, k] - mean_train[control, k]}} (conditions with controls)."""
    means, ctrl = _means(train, separator)
    out: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
    for (p, k), m in means.items():
        if k in ctrl:
            out.setdefault(p, {})[k] = (m - ctrl[k]).astype(np.float32)
    return out


def baseline_split(name: str, cells: SplitCells, sources: dict[tuple[str, ...], np.ndarray],
                   train: SplitCells | None, seed: int = 0, upper: float = np.inf,
                   separator: str = "+") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(x (n, G) float32, the real row each predicted cell copies its labels from, info) for baseline `name`."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r} (known: {list(BASELINES)})")
    eff = effects(train, separator) if name == "additive" and train is not None else {}
    xs, src, unseen = [], [], set()
    for key, rows in perturbed_groups(cells).items():
        rng = np.random.default_rng(group_seed(seed, "baseline|" + "|".join(key)))
        pool = sources[condition_key(cells, int(rows[0]))]
        x = pool[rng.integers(len(pool), size=len(rows))].astype(np.float32)
        if name == "additive":
            label, cond = key[0], condition_key(cells, int(rows[0]))
            for comp in (c.strip() for c in label.split(separator)):
                by_cond = eff.get(comp)
                if not by_cond:
                    unseen.add(comp)
                    continue
                x = x + (by_cond[cond] if cond in by_cond else np.mean(list(by_cond.values()), axis=0))
            x = np.clip(x, 0.0, upper)
        xs.append(x)
        src.append(rows)
    info = {"baseline": name, "unseen_components": sorted(unseen)}
    return np.concatenate(xs).astype(np.float32), np.concatenate(src), info
