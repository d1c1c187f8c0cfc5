"""Evaluation report: metrics.json, metrics.md (a Table-4-style guidance sweep), grids and a metric-vs-w plot.

`results` (what `evaluate` assembles) is a JSON-able dict:
  {"run_dir", "split", "num_real", "solver": {...}, "mode", "features": {set: {"names": [...], "note": str}},
   "sweep": [{"w", "nfe", "num_generated", "seconds", "metrics": {"FD_morph": .., "KD_morph": .., "KD_morph_std": ..}}],
   "grids": [relative paths], ...}
KD/KID values in `metrics` are already multiplied by KID_SCALE (1000), as in the paper's tables.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from phenoflow.eval.metrics import KID_SCALE

# Feature set -> (Fréchet metric name, kernel metric name), in table order.
METRIC_NAMES = {
    "dinov2": ("FD_DINOv2", "KD_DINOv2"),
    "inception": ("FID", "KID"),
    "morphology": ("FD_morph", "KD_morph"),
}

FEATURE_NOTES = {
    "inception": "Inception-v3 pool3 (2048-d) of the FID network, images projected to RGB and resized to 299",
    "dinov2": "DINOv2 ViT-L/14 CLS features (1024-d), images projected to RGB",
    "morphology": ("weight-free morphology features (phenoflow.eval.morphology: per-channel intensity statistics, "
                   "texture, nucleus segmentation of channel 0), z-scored with the real set's mean and std "
                   "(std floored at 1% of scale) and soft-clipped to +-10 (10 tanh(z / 10))"),
}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def metric_columns(features: list[str]) -> list[str]:
    cols = []
    for f in ("dinov2", "inception", "morphology"):
        if f in features:
            cols += list(METRIC_NAMES[f])
    return cols


def markdown_table(results: dict[str, Any]) -> str:
    """The guidance sweep as a Markdown table: w, NFE, then FD/KD per available feature set."""
    cols = metric_columns(list(results["features"]))
    head = ["w", "NFE"] + [c + (" (x1000)" if c.startswith("K") else "") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["sweep"]:
        vals = [_fmt(row["w"]), _fmt(row.get("nfe"))] + [_fmt(row["metrics"].get(c)) for c in cols]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def per_perturbation_tables(results: dict[str, Any], max_rows: int = 100) -> list[str]:
    """One Markdown table per w of the per-perturbation metrics (when they were computed)."""
    cols = metric_columns(list(results["features"]))
    lines: list[str] = []
    for row in results["sweep"]:
        per = row.get("per_perturbation")
        if not per:
            continue
        head = ["perturbation", "n real"] + [c + (" (x1000)" if c.startswith("K") else "") for c in cols]
        lines += ["", f"### w = {row['w']:g}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, vals in list(per.items())[:max_rows]:
            lines.append("| " + " | ".join([name, str(vals.get("n_real", ""))] + [_fmt(vals.get(c)) for c in cols])
                         + " |")
        if len(per) > max_rows:
            lines.append(f"\n({len(per) - max_rows} more in metrics.json)")
    if lines:
        lines = ["", "## Per perturbation", "", ("Within-perturbation distances (small sets: biased upwards; "
                 "for comparing models and guidance strengths, not with the overall numbers).")] + lines
    return lines


def plot_sweep(results: dict[str, Any], path: Path) -> Path | None:
    """Metric against guidance strength w, one panel per metric (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = metric_columns(list(results["features"]))
    if not cols:
        return None
    ws = [r["w"] for r in results["sweep"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.8), squeeze=False)
    for ax, c in zip(axes[0], cols):
        ys = [r["metrics"].get(c, float("nan")) for r in results["sweep"]]
        ax.plot(ws, ys, "o-")
        std = [r["metrics"].get(c + "_std") for r in results["sweep"]]
        if all(s is not None for s in std):
            ax.errorbar(ws, ys, yerr=std, fmt="none", capsize=3)
        ax.set_xlabel("guidance strength w")
        ax.set_title(c + (" (x1000)" if c.startswith("K") else ""))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _controls(results: dict[str, Any]) -> str:
    """The protocol's treatment of control images, for the report's first line."""
    if "include_controls" not in results:
        return "controls: not recorded"
    if results["include_controls"]:
        return "control images included: eval.include_controls=true"
    return "control images excluded, as in the MiT RxRx1 protocol"


def write_report(report_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write metrics.json, metrics.md and guidance.png into report_dir (grids are written by the caller)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results, kd_scale=KID_SCALE)
    plot = plot_sweep(results, report_dir / "guidance.png")
    if plot is not None:
        results["plot"] = plot.name
    _atomic_write(report_dir / "metrics.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
    feats = results["features"]
    lines = [
        "# phenoflow evaluation report",
        "",
        (f"Run: `{results.get('run_dir', '')}`; split `{results.get('split', '')}` with "
         f"{results.get('num_real', '?')} real images ({_controls(results)}); one generated image per real image, "
         f"with its labels ({results.get('mode', 'generate')} mode)."),
        f"Sampler: {results.get('solver', {})}.",
        "",
        "## Guidance sweep",
        "",
        markdown_table(results),
        "",
        ("NFE: evaluations of the velocity field per solve (mean over batches); with guidance (w not 0 or 1) "
         "each evaluation is two network forwards, batched as one. "
         "KD/KID: unbiased MMD^2 with the cubic kernel (gamma = 1/d, coef 1) averaged over 100 subsets of "
         "min(100, n) images (as in the MiT code: torch-fidelity kid_subset_size=100), "
         f"multiplied by {int(KID_SCALE)}."),
        "",
        "## Features used",
        "",
    ]
    for name, info in feats.items():
        lines.append(f"- **{name}**: {info.get('note', FEATURE_NOTES.get(name, ''))} ({info.get('dim', '?')} dims)")
    missing = results.get("features_skipped", {})
    for name, why in missing.items():
        lines.append(f"- {name}: not computed ({why})")
    if plot is not None:
        lines += ["", f"![metric against guidance]({plot.name})"]
    lines += per_perturbation_tables(results)
    if results.get("grids"):
        lines += ["", "## Real (left) against generated (right), per perturbation", ""]
        lines += [f"![grid]({g})" for g in results["grids"]]
    _atomic_write(report_dir / "metrics.md", "\n".join(lines) + "\n")
    return report_dir
