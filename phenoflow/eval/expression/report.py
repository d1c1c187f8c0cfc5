"""`evaluate_expression_run(cfg, run_dir)`: sample (generate.py) -> score (evaluate_expression) -> report.

For every guidance strength w in cfg.eval.guidance the split's predictions are scored against its real cells;
report_dir (default run_dir/report) receives:
  predictions/real_<split>.h5ad, predictions/pred_w<w>.h5ad   the pair cell-eval reads (generate.py)
  metrics_w<w>.csv      the tidy table (metric, aggregation, covariate, perturbation, value, convention)
  predictions/pred_baseline_<name>.h5ad, metrics_baseline_<name>.csv   the reference baselines of
                        cfg.eval.baselines (baselines.py: control, additive), scored the same way
  summary.csv           summarize() of every w: the mean over (covariate, perturbation) groups
  metrics.md            the summary table with the conventions, the run's solver settings and the figures
  pca_w<w>.png          real vs generated cells on the reference's first two principal components, one small
                        panel per (covariate, perturbation) group (at most MAX_PANELS), real controls in grey
  mean_shift_w<w>.png   per gene: predicted vs real mean shift from the covariate-matched real controls (log1p)
                        for a few perturbations, with the Pearson r of the shifts
  loss.png              the training loss from run_dir/log.jsonl
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from phenoflow.config import Config

log = logging.getLogger("phenoflow.eval")
MAX_PANELS = 24
SHIFT_PANELS = 4


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(obs, pert_col: str, control: str, cov_cols: list[str]) -> list[tuple[str, str, np.ndarray]]:
    """(covariate text, perturbation, boolean mask) of every perturbed group, sorted."""
    cov = obs[cov_cols].astype(str).agg("_".join, axis=1).to_numpy() if cov_cols else np.full(len(obs), "")
    pert = obs[pert_col].astype(str).to_numpy()
    pairs = sorted({(c, p) for c, p in zip(cov, pert) if p != control})
    return [(c, p, (cov == c) & (pert == p)) for c, p in pairs]


def _control_mask(obs, pert_col: str, control: str, cov_cols: list[str], cov: str) -> np.ndarray:
    c = obs[cov_cols].astype(str).agg("_".join, axis=1).to_numpy() if cov_cols else np.full(len(obs), "")
    return (obs[pert_col].astype(str).to_numpy() == control) & (c == cov)


def plot_pca(real, pred, pert_col: str, control: str, cov_cols: list[str], path: Path, title: str) -> Path:
    """Small multiples: each perturbed group's real (blue) and generated (orange) cells on PC1/PC2 of the
    reference (all real cells of the split), the group's real controls in grey."""
    from sklearn.decomposition import PCA

    plt = _plt()
    xr, xp = np.asarray(real.X, np.float64), np.asarray(pred.X, np.float64)
    pca = PCA(n_components=2, random_state=0).fit(xr)
    zr, zp = pca.transform(xr), pca.transform(xp)
    groups = _groups(real.obs, pert_col, control, cov_cols)[:MAX_PANELS]
    gp = {(c, p): m for c, p, m in _groups(pred.obs, pert_col, control, cov_cols)}
    ncol = min(6, max(1, len(groups)))
    nrow = max(1, -(-len(groups) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 2.2 * nrow), squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (cov, pert, m) in zip(axes.flat, groups):
        ax.set_axis_on()
        ctrl = _control_mask(real.obs, pert_col, control, cov_cols, cov)
        ax.scatter(*zr[ctrl].T, s=3, c="0.8", label="control")
        ax.scatter(*zr[m].T, s=4, c="tab:blue", alpha=0.7, label="real")
        if (cov, pert) in gp:
            ax.scatter(*zp[gp[(cov, pert)]].T, s=4, c="tab:orange", alpha=0.7, label="generated")
        ax.set_title(f"{pert}\n{cov}" if cov else pert, fontsize=7)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6, markerscale=2, loc="best")
    ev = pca.explained_variance_ratio_ * 100
    fig.suptitle(f"{title}: PC1 ({ev[0]:.0f}%) vs PC2 ({ev[1]:.0f}%) of the real split", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mean_shift(real, pred, pert_col: str, control: str, cov_cols: list[str], path: Path, title: str) -> Path:
    """Per gene: predicted mean - real control mean (y) against real mean - real control mean (x), log1p, for
    the SHIFT_PANELS groups with the largest real shift (the controls are the covariate-matched REAL ones)."""
    plt = _plt()
    xr, xp = np.asarray(real.X, np.float64), np.asarray(pred.X, np.float64)
    gp = {(c, p): m for c, p, m in _groups(pred.obs, pert_col, control, cov_cols)}
    rows = []
    for cov, pert, m in _groups(real.obs, pert_col, control, cov_cols):
        ctrl = _control_mask(real.obs, pert_col, control, cov_cols, cov)
        if (cov, pert) not in gp or not ctrl.any():
            continue
        base = xr[ctrl].mean(0)
        dr, dp = xr[m].mean(0) - base, xp[gp[(cov, pert)]].mean(0) - base
        rows.append((float(np.abs(dr).sum()), cov, pert, dr, dp))
    rows = sorted(rows, key=lambda r: -r[0])[:SHIFT_PANELS]
    fig, axes = plt.subplots(1, max(1, len(rows)), figsize=(3 * max(1, len(rows)), 3), squeeze=False)
    for ax, (_, cov, pert, dr, dp) in zip(axes.flat, rows):
        lim = float(max(np.abs(dr).max(), np.abs(dp).max(), 1e-3)) * 1.05
        ax.plot([-lim, lim], [-lim, lim], c="0.6", lw=0.8)
        ax.scatter(dr, dp, s=5, alpha=0.7)
        r = np.corrcoef(dr, dp)[0, 1] if dr.std() > 0 and dp.std() > 0 else float("nan")
        ax.set_title(f"{pert} {cov}\nPearson r = {r:.2f}", fontsize=8)
        ax.set_xlabel("real mean shift vs control", fontsize=7)
        ax.set_ylabel("predicted mean shift", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(run_dir: Path, path: Path) -> Path | None:
    """Training loss against samples seen, from the run's log.jsonl (None when there is no log)."""
    logf = Path(run_dir) / "log.jsonl"
    if not logf.is_file():
        return None
    pts = []
    for line in logf.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "train" and "loss" in e:
            pts.append((e["samples"], e["loss"]))
    if not pts:
        return None
    plt = _plt()
    s, loss = np.asarray(pts, np.float64).T
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(s, loss, lw=1)
    ax.set_xlabel("samples seen (cells)")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.set_title("training loss", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_markdown(summary, columns: list[str]) -> str:
    """One row per (metric, aggregation): the mean over groups for each column of `summary["source"]` (the model
    at each w, then the baselines), the group count and the convention."""
    head = "| metric | aggregation | " + " | ".join(columns) + " | groups | convention |"
    lines = [head, "|" + "---|" * (len(columns) + 4)]
    for (metric, agg, conv), g in summary.groupby(["metric", "aggregation", "convention"], sort=False):
        vals = {str(r.source): r.mean for r in g.itertuples()}
        cells = " | ".join(f"{vals[c]:.4g}" if c in vals else "" for c in columns)
        conv = str(conv).replace("|", "\\|")  # a pipe inside a cell would end it
        lines.append(f"| {metric} | {agg} | {cells} | {int(g['n_perturbations'].iloc[0])} | {conv} |")
    return "\n".join(lines)


def score_baselines(cfg: Config, s: dict, out_dir: Path, seed: int = 0) -> list[tuple[str, Path, dict]]:
    """Write pred_baseline_<name>.h5ad for each of cfg.eval.baselines (baselines.py) -> [(name, path, info)]."""
    if not cfg.eval.baselines:
        return []
    from phenoflow.data.shards import load_manifest

    from .baselines import baseline_split
    from .generate import control_sources, prediction_anndata, read_split

    cells = s["cells"]
    train = read_split(s["data_dir"], "train", checksums=cfg.data.checksums) if s["split"] != "train" else cells
    sources = control_sources(cells, train)
    sep = load_manifest(s["data_dir"])["columns"].get("separator") or "+"
    out = []
    for name in cfg.eval.baselines:
        x, src, info = baseline_split(name, cells, sources, train, seed=seed, upper=s["clamp"][1], separator=sep)
        path = out_dir / f"pred_baseline_{name}.h5ad"
        prediction_anndata(cells, x, src, {**info, "split": s["split"], "seed": seed}).write_h5ad(path)
        out.append((name, path, info))
    return out


def evaluate_expression_run(cfg: Config, run_dir: str | Path | None = None, report_dir: str | Path | None = None,
                            seed: int = 0, data_dir: str | Path | None = None, mode: str = "generate",
                            model: Any = None) -> Path:
    """Sample, score and report every w of cfg.eval.guidance (module docstring); returns report_dir."""
    import pandas as pd

    from phenoflow.eval.expression import evaluate_expression, summarize

    from .generate import sample_expression

    run_dir = Path(run_dir or cfg.run_dir)
    report_dir = Path(report_dir or run_dir / "report")
    s = sample_expression(cfg, run_dir, report_dir / "predictions", seed=seed, data_dir=data_dir, mode=mode,
                          model=model)
    import anndata

    cells = s["cells"]
    cov_cols = list(cells.covariates)
    if cells.obs[cells.dataset_col].nunique() > 1:
        cov_cols.append(cells.dataset_col)  # an atlas: the source dataset is a covariate
    real = anndata.read_h5ad(s["real"])
    kw = {"pert_col": cells.pert_col, "control": cells.control, "covariate_cols": tuple(cov_cols)}
    summaries, figures, ws = [], [], list(cfg.eval.guidance)
    for w in ws:
        pred = anndata.read_h5ad(s["pred"][w])
        table = evaluate_expression(pred, real, **kw)
        table.to_csv(report_dir / f"metrics_w{w:g}.csv", index=False)
        summ = summarize(table)
        summ.insert(0, "w", float(w))
        summ.insert(0, "source", f"w={w:g}")
        summaries.append(summ)
        tag = f"w{w:g}"
        figures.append(plot_pca(real, pred, cells.pert_col, cells.control, cov_cols, report_dir / f"pca_{tag}.png",
                                f"w = {w:g}").name)
        figures.append(plot_mean_shift(real, pred, cells.pert_col, cells.control, cov_cols,
                                       report_dir / f"mean_shift_{tag}.png", f"w = {w:g}").name)
    columns = [f"w={w:g}" for w in ws]
    for name, path, info in score_baselines(cfg, s, report_dir / "predictions", seed):
        table = evaluate_expression(anndata.read_h5ad(path), real, **kw)
        table.to_csv(report_dir / f"metrics_baseline_{name}.csv", index=False)
        summ = summarize(table)
        summ.insert(0, "w", float("nan"))
        summ.insert(0, "source", f"{name} baseline")
        summaries.append(summ)
        columns.append(f"{name} baseline")
        if info["unseen_components"]:
            log.info("%s baseline: components never trained (no effect added): %s", name, info["unseen_components"])
    summary = pd.concat(summaries, ignore_index=True)
    summary.to_csv(report_dir / "summary.csv", index=False)
    loss = plot_loss(run_dir, report_dir / "loss.png")
    if loss is not None:
        figures.append(loss.name)
    n_groups = int(sum(1 for _ in _groups(real.obs, cells.pert_col, cells.control, cov_cols)))
    n_ctrl = int(cells.is_control.sum())
    md = [f"# Expression evaluation: {run_dir}", "",
          (f"Split `{s['split']}` of `{s['data_dir']}`: {len(cells.x) - n_ctrl} perturbed cells in {n_groups} "
          f"(covariate, perturbation) groups, {n_ctrl} real control cells, {len(cells.genes)} genes. "
          f"Solver {cfg.eval.solver} ({cfg.eval.steps} steps for fixed-step solvers), guidance over "
          f"{list(cfg.eval.guidance_groups)}, EMA std {cfg.eval.ema_std}, seed {seed}; generated log1p values "
          f"clamped to [0, {s['clamp'][1]:.3g}] (the training split's maximum)."), "",
          "NFE / seconds per w: " + ", ".join(f"w={w:g}: {s['nfe'][w]:.0f} / {s['seconds'][w]:.1f}s" for w in ws),
          "", "## Metrics (mean over groups)", "",
          ("PerturBench metrics use the reference's (covariate, perturbation) groups with the prediction's controls "
          "replaced by the real ones; `vcc:cell-eval` rows use the prediction file's own controls (cell-eval's "
          "convention), `vcc:real_controls` the real ones. Lower is better for rmse, mae, energy_distance, mmd, "
          "rbf_mmd2 and every *_rank (0 best, ~0.5 random); higher for cosine, r2_score, top_k_recall, "
          "discrimination_score_l1 and overlap_at_N."), "",
          ("Baselines (same cells, same metrics; `baselines.py`): `control` predicts the matched real control "
          "cells (no effect); `additive` shifts them by the sum of each component's mean effect on the training "
          "split (PerturBench's additive baseline). A model is useful where it beats both."
          if len(columns) > len(ws) else ""), "",
          summary_markdown(summary, columns), "",
          ("Per-group values: `metrics_w<w>.csv`. Score the same files with cell-eval: `cell-eval run -ap "
          f"predictions/pred_w{ws[0]:g}.h5ad -ar predictions/{s['real'].name} --profile vcc --pert-col "
          f"{cells.pert_col} --control-pert {cells.control}`."), "", "## Figures", ""]
    md += [f"![{f}]({f})" for f in figures]
    (report_dir / "metrics.md").write_text("\n".join(md) + "\n")
    (report_dir / "results.json").write_text(json.dumps(
        {"run_dir": str(run_dir), "split": s["split"], "guidance": ws, "nfe": {str(k): v for k, v in s["nfe"].items()},
         "clamp": s["clamp"], "figures": figures, "summary": summary.to_dict(orient="records")}, indent=1))
    return report_dir
