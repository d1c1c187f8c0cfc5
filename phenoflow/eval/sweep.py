"""Guidance x EMA-width sweep: `phenoflow evaluate --ema-sweep 0.01 0.03 0.05 ...` (or `sweep(...)` here).

For each EMA width (relative std, as in EDM2), the model's weights are
  - the exported average (run_dir/export/ema-<std>.safetensors) when the run tracked that width,
  - the raw weights for std 0,
  - otherwise reconstructed post hoc from the run's snapshots (phenoflow/train/posthoc_ema.py: a least-squares
    combination of the snapshots of the tracked widths; the fit's relative residual is reported);
and `evaluate` runs every guidance strength of eval.guidance on it. Each width gets its own report in
REPORT_DIR/ema-<std>/; REPORT_DIR/sweep.json and sweep.md hold the table (one row per width and guidance, every
metric) and the best row per metric (lower is better for FD/KD/FID/KID-type metrics). The metrics also go to
the run's TensorBoard folder (tag sweep/<metric>/w<w>, step = the width in units of 1e-4: a curve over the width)
with the sample grids. `report_to_tensorboard` does the same for a plain `evaluate` report (step = samples seen).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from phenoflow.eval.report_extras import export_samples_seen

log = logging.getLogger(__name__)


def _tracked(run_dir: Path) -> dict[str, Path]:
    from phenoflow.train.ema import std_key

    out = {}
    for p in (run_dir / "export").glob("ema-*.safetensors"):
        try:
            out[std_key(float(p.name[len("ema-"):-len(".safetensors")]))] = p
        except ValueError:
            continue
    return out


def model_for_width(run_dir: str | Path, std: float, at: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, provenance) with the weights of EMA width `std` (0: raw): exported if tracked, else post hoc."""
    from phenoflow.eval.evaluate import load_export
    from phenoflow.train.checkpoint import load_weights
    from phenoflow.train.ema import std_key

    run_dir = Path(run_dir)
    tracked = _tracked(run_dir)
    if std == 0 or (std_key(std) in tracked and at is None):
        model, _, _ = load_export(run_dir, std)
        return model, {"std": std, "source": "raw weights" if std == 0 else "tracked (export)"}
    from phenoflow.train.posthoc_ema import reconstruct

    if not tracked:
        raise FileNotFoundError(f"{run_dir / 'export'} has no EMA weights: train the run first")
    any_std = float(min(tracked))
    model, _, _ = load_export(run_dir, any_std)  # the architecture; the weights are replaced below
    state, info = reconstruct(run_dir, std, at=at)
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) for k, v in state.items() if k in own}
    load_weights(model, state, run_dir / "checkpoints" / "snapshots", built_from=str(run_dir / "export" / "model.json"))
    return model, {"std": std, "source": "post-hoc reconstruction", "residual": info["residual"],
                   "at_samples": info["at_samples"], "snapshots": len(info["coefficients"]) // max(len(info["use_stds"]), 1)}


def _source(run_dir: Path, prov: dict[str, Any], at: int | None) -> dict[str, Any]:
    """The report's provenance of one width: which file or reconstruction, the width, samples seen."""
    export = Path(run_dir) / "export"
    seen = export_samples_seen(export)
    if prov["source"] == "post-hoc reconstruction":
        text = (f"post-hoc EMA reconstructed from {prov['snapshots']} snapshots of `{Path(run_dir) / 'checkpoints'}` "
                f"(relative residual {prov['residual']:.1e})")
        seen = prov.get("at_samples", seen)
    else:
        from phenoflow.train.checkpoint import ema_filename

        text = f"checkpoint `{export / (ema_filename(prov['std']) if prov['std'] else 'model.safetensors')}`"
    out = {"checkpoint": text, "ema_std": float(prov["std"])}
    return out if seen is None else {**out, "samples_seen": int(seen)}


def _lower_is_better(metric: str) -> bool:
    return not any(k in metric.lower() for k in ("precision", "recall", "accuracy", "r2", "cosine", "pds"))


def sweep(cfg, run_dir: str | Path | None, ema_stds: list[float], report_dir: str | Path | None = None,
          at: int | None = None, **evaluate_kw) -> Path:
    """Evaluate every (EMA width, guidance) pair; returns REPORT_DIR (default run_dir/report/sweep)."""
    from phenoflow.eval.evaluate import evaluate

    run_dir = Path(run_dir or cfg.run_dir)
    base = Path(report_dir) if report_dir else run_dir / "report" / "sweep"
    rank0 = int(os.environ.get("RANK", "0")) == 0
    rows, widths = [], []
    for std in ema_stds:
        model, prov = model_for_width(run_dir, float(std), at)
        widths.append(prov)
        if rank0:
            log.info("EMA width %g: %s%s", std, prov["source"],
                     f" (relative residual {prov['residual']:.2e})" if "residual" in prov else "")
        sub = base / f"ema-{float(std):.4f}"
        evaluate(cfg, run_dir, model=model, report_dir=sub, model_source=_source(run_dir, prov, at), **evaluate_kw)
        if rank0:
            results = json.loads((sub / "metrics.json").read_text())
            for r in results.get("sweep", []):
                rows.append({"ema_std": float(std), "w": r["w"], "nfe": r.get("nfe"), **r.get("metrics", {})})
            _to_tensorboard(run_dir, float(std), results, sub)
    if rank0:
        _write(base, rows, widths)
    return base


def _to_tensorboard(run_dir: Path, std: float, results: dict, sub: Path) -> None:
    from phenoflow.train.run_log import log_eval_to_tensorboard

    step = round(std * 1e4)
    scalars = {f"sweep/{k}/w{r['w']:g}": v for r in results.get("sweep", []) for k, v in r.get("metrics", {}).items()
               if isinstance(v, (int, float))}
    images = {f"sweep/grid/{name[:-4]}": sub / name for name in results.get("grids", []) if (sub / name).is_file()}
    log_eval_to_tensorboard(run_dir, step, scalars, images)


def report_to_tensorboard(run_dir: str | Path, report_dir: str | Path, prefix: str = "eval") -> bool:
    """An `evaluate` report (metrics.json, grids) into the run's TensorBoard folder at the export's sample
    count: tags <prefix>/<metric>/w<w> and <prefix>/grid/<name>. False when there is nothing to log or no
    tensorboard package (said once). Rank 0 calls it."""
    from phenoflow.train.run_log import log_eval_to_tensorboard

    run_dir, report_dir = Path(run_dir), Path(report_dir)
    try:
        results = json.loads((report_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    step = export_samples_seen(run_dir / "export") or 0
    scalars = {f"{prefix}/{k}/w{r['w']:g}": v for r in results.get("sweep", []) for k, v in r.get("metrics", {}).items()
               if isinstance(v, (int, float))}
    images = {f"{prefix}/grid/{n[:-4]}": report_dir / n for n in results.get("grids", []) if (report_dir / n).is_file()}
    return log_eval_to_tensorboard(run_dir, step, scalars, images)


def _write(base: Path, rows: list[dict], widths: list[dict]) -> None:
    metrics = sorted({k for r in rows for k in r} - {"ema_std", "w", "nfe"})
    best = {}
    for m in (m for m in metrics if not m.endswith("_std")):  # spreads of an estimate are not scores
        have = [r for r in rows if isinstance(r.get(m), (int, float))]
        if have:
            pick = (min if _lower_is_better(m) else max)(have, key=lambda r: r[m])
            best[m] = {"ema_std": pick["ema_std"], "w": pick["w"], "value": pick[m]}
    base.mkdir(parents=True, exist_ok=True)
    (base / "sweep.json").write_text(json.dumps({"widths": widths, "rows": rows, "best": best}, indent=2) + "\n")
    lines = ["# Guidance x EMA-width sweep", "",
             "| EMA std | weights | w | NFE | " + " | ".join(metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    src = {w["std"]: w["source"] + (f" (residual {w['residual']:.1e})" if "residual" in w else "") for w in widths}
    for r in rows:
        nfe = f"{r['nfe']:.0f}" if isinstance(r.get("nfe"), (int, float)) else ""
        vals = " | ".join(f"{r[m]:.4g}" if isinstance(r.get(m), (int, float)) else "" for m in metrics)
        lines.append(f"| {r['ema_std']:g} | {src.get(r['ema_std'], '')} | {r['w']:g} | {nfe} | {vals} |")
    lines += ["", "Best per metric: " + ", ".join(f"{m} {b['value']:.4g} (EMA {b['ema_std']:g}, w {b['w']:g})"
                                                  for m, b in best.items()), ""]
    (base / "sweep.md").write_text("\n".join(lines))
