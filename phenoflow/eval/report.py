"""Evaluation report: metrics.json, metrics.md and index.html (the same content: a Table-4-style guidance sweep,
the model's provenance, the training loss, grids with a channel legend, per-perturbation tables, the documented
synthetic effects measured on real and generated images), guidance.png, loss.png and channels.png.

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

from phenoflow.eval.grids import save_png
from phenoflow.eval.metrics import KID_SCALE
from phenoflow.eval.report_html import H, Img, Items, P, Section, Table

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
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def metric_columns(features: list[str]) -> list[str]:
    cols = []
    for f in ("dinov2", "inception", "morphology"):
        if f in features:
            cols += list(METRIC_NAMES[f])
    return cols


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
    save_png(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


MODE_TEXT = {  # how each generation mode starts (phenoflow/eval/generate.py), for the report's first line
    "generate": "from N(0, I) noise",
    "counterfactual": "from a control image of the same experiment, inverted to noise with its own labels",
    "control": "from a control image of the same experiment + flow.control_noise x N(0, I) (Config A, "
               "flow.coupling=control)",
}


def _mode(results: dict[str, Any]) -> str:
    mode = results.get("mode", "generate")
    return f"{mode} mode: {MODE_TEXT[mode]}" if mode in MODE_TEXT else f"{mode} mode"


def _controls(results: dict[str, Any]) -> str:
    """The protocol's treatment of control images, for the report's first line."""
    if "include_controls" not in results:
        return "controls: not recorded"
    if results["include_controls"]:
        return "control images included: eval.include_controls=true"
    return "control images excluded, as in the MiT RxRx1 protocol"


def _count(v: Any) -> str:
    return f"{int(v):,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def _num(v: Any) -> str:
    """A measured value for people: 3 decimals below 10, 1 decimal below 1000, thousands separators above."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    return f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else f"{v:.3f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"x{v:.2f}"


def solver_text(solver: dict[str, Any]) -> str:
    """'heun, 20 steps; guidance on perturbation' from the results' solver entry (no dict reprs)."""
    method = solver.get("method", "?")
    if method in ("euler", "heun", "midpoint"):
        text = f"{method}, {_count(solver.get('steps'))} steps"
    else:
        text = f"{method}, rtol {solver.get('rtol', '?'):g}, atol {solver.get('atol', '?'):g}" if isinstance(
            solver.get("rtol"), float) and isinstance(solver.get("atol"), float) else str(method)
    groups = solver.get("guidance_groups")
    if groups:
        text += "; guidance on " + ", ".join(groups)
    return text


def provenance_text(prov: dict[str, Any] | None) -> str:
    """Which weights produced the report, as one sentence."""
    if not prov:
        return "Model: not recorded."
    width = f"EMA width {prov['ema_std']:g}" if prov.get("ema_std") else "raw weights (no EMA)"
    seen = prov.get("samples_seen")
    if not prov.get("from_run"):
        if "samples_seen" not in prov:
            return f"Model: {prov.get('checkpoint')}; eval.ema_std={prov.get('ema_std', 0):g} does not apply."
        return f"Model: {width}, {prov.get('checkpoint')}, after {_count(seen)} samples seen."
    bs = prov.get("batch_size") or 0
    length = (f"after {_count(seen)} samples seen ({_count(seen // bs) if bs else '?'} steps of {bs}) of "
              f"train.total_samples {_count(prov.get('total_samples'))}") if seen is not None else "training length unknown"
    return f"Model: {width}, checkpoint `{prov.get('checkpoint')}`, {length}."


def plot_loss(run_dir: str | Path, path: Path) -> Path | None:
    """Training loss against samples seen from run_dir/log.jsonl (None when there is no train record)."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return None
    pts = []
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("event") == "train" and "loss" in e and "samples" in e:
            pts.append((float(e["samples"]), float(e["loss"])))
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=2, lw=1)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("training loss (log.jsonl)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


def _head(c: str) -> str:
    return c + (" (x1000)" if c.startswith("K") else "")


def _sweep_table(results: dict[str, Any]) -> Table:
    cols = metric_columns(list(results["features"]))
    rows = [[_fmt(r["w"]), _count(round(r["nfe"])) if r.get("nfe") is not None else "-"]
            + [_fmt(r["metrics"].get(c)) for c in cols] for r in results["sweep"]]
    return Table(["w", "NFE"] + [_head(c) for c in cols], rows)


def _per_perturbation(results: dict[str, Any], max_rows: int = 100) -> list[Section]:
    """Per w: n real / generated, FD/KD within the perturbation (when computed), morphology means real / generated."""
    from phenoflow.eval.effects import MEANS

    cols = metric_columns(list(results["features"]))
    extra = {e["w"]: e for e in results.get("report_per_w", [])}
    out: list[Section] = []
    for row in results["sweep"]:
        per, means = row.get("per_perturbation") or {}, extra.get(row["w"], {}).get("morphology_means") or {}
        if not per and not means:
            continue
        have = [c for c in cols if any(c in v for v in per.values())]
        head = ["perturbation", "n real"] + (["n generated"] if means else []) + [_head(c) for c in have]
        head += [f"{t} real / gen" for _, t in MEANS] if means else []
        rows = []
        for name in list(dict.fromkeys(list(means) + list(per)))[:max_rows]:
            p, m = per.get(name, {}), means.get(name, {})
            if means:
                cells = [name, _count(m.get("n_real", p.get("n_real"))), _count(m.get("n_generated", 0))]
            else:
                cells = [name, _count(p.get("n_real"))]
            cells += [_fmt(p.get(c)) for c in have]
            if means:
                cells += [" / ".join(_num(v) for v in m.get(k, [None, None])) for k, _ in MEANS]
            rows.append(cells)
        out += [H(3, f"w = {row['w']:g}"), Table(head, rows)]
    if not out:
        return []
    return [H(2, "Per perturbation"),
            P("Within-perturbation distances (eval.per_perturbation; small sets: biased upwards; for comparing models "
              "and guidance strengths, not with the overall numbers) and the mean of morphology features over the "
              "perturbation's real and generated images (the control row: control images generated for this report, "
              "not scored).")] + out


def _effects(results: dict[str, Any]) -> list[Section]:
    from phenoflow.eval.effects import TOLERANCE

    per_w = [e for e in results.get("report_per_w", []) if "effects" in e]
    if not per_w:
        if results.get("report_per_w"):
            return [H(2, "Documented effects"), P("The data are not synthetic: no documented effects to measure.")]
        return []
    out: list[Section] = [
        H(2, "Documented effects: real against generated"),
        P("Each perturbation's primary effect as phenoflow.data.synthetic documents it, measured with a morphology "
          "feature as the ratio perturbation mean / control mean within the real images and within the generated "
          f"images. Reproduced: the generated ratio moves in the documented direction and ln(generated) is within "
          f"{TOLERANCE:.0%} of ln(real)."),
    ]
    for e in per_w:
        rows = [[r["perturbation"], r["effect"], r["feature"], _ratio(r["real_ratio"]), _ratio(r["generated_ratio"]),
                 r["reproduced"]] for r in e["effects"]]
        n_ok = sum(r["reproduced"] == "yes" for r in e["effects"])
        out += [H(3, f"w = {e['w']:g}: {n_ok} of {len(rows)} reproduced"),
                Table(["perturbation", "documented effect", "measured as", "real vs control",
                       "generated vs control", "reproduced"], rows)]
    return out


def _legend(results: dict[str, Any], report_dir: Path) -> list[Section]:
    from phenoflow.eval.grids import channel_legend, save_legend

    chans = results.get("channels") or []
    legend = channel_legend(len(chans), chans)
    if not legend:
        return []
    results["channel_legend"] = legend
    save_legend(legend, report_dir / "channels.png")
    how = ("6 channels are projected to RGB with the CellFlux weights (phenoflow.eval.project): on images in [-1, 1], "
           "rgb = clamp(sum over channels of x_c (R, G, B)_c, -1, 1), then mapped to [0, 1]."
           if len(chans) == 6 else "3 channels are shown as RGB as they are.")
    rows = [[f"ch{e['channel']}", e["name"], "(" + ", ".join(f"{x:g}" for x in e["rgb"]) + ")", e["hex"]]
            for e in legend]
    return [P("Channel colours: " + how), Table(["channel", "stain", "(R, G, B)", "colour"], rows),
            Img("channel legend", "channels.png")]


def write_report(report_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write metrics.json, metrics.md, index.html, guidance.png, loss.png and channels.png into report_dir
    (grids are written by the caller)."""
    from phenoflow.eval.report_html import to_html, to_markdown

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results, kd_scale=KID_SCALE)
    plot = plot_sweep(results, report_dir / "guidance.png")
    if plot is not None:
        results["plot"] = plot.name
    loss = plot_loss(results.get("run_dir", ""), report_dir / "loss.png") if results.get("run_dir") else None
    if loss is not None:
        results["loss_plot"] = loss.name
    legend = _legend(results, report_dir)
    feats = results["features"]
    doc: list[Section] = [
        H(1, "phenoflow evaluation report"),
        P(f"Run: `{results.get('run_dir', '')}`; split `{results.get('split', '')}` with "
          f"{results.get('num_real', '?')} real images ({_controls(results)}); one generated image per real image, "
          f"with its labels ({_mode(results)})."),
        P(provenance_text(results.get("provenance"))),
        P(f"Sampler: {solver_text(results.get('solver', {}))}."),
        H(2, "Guidance sweep"),
        _sweep_table(results),
        P("NFE: evaluations of the velocity field per solve (mean over batches, rounded); with guidance (w not 0 or 1) "
          "each evaluation is two network forwards, batched as one. "
          "KD/KID: unbiased MMD^2 with the cubic kernel (gamma = 1/d, coef 1) averaged over 100 subsets of "
          "min(100, n) images (as in the MiT code: torch-fidelity kid_subset_size=100), "
          f"multiplied by {int(KID_SCALE)}."),
    ]
    if plot is not None:
        doc.append(Img("metric against guidance", plot.name))
    doc += [H(2, "Training loss"),
            Img("training loss", loss.name) if loss is not None else P("No training records in the run's log.jsonl.")]
    if results.get("grids"):
        doc += [H(2, "Real (left) against generated (right), per perturbation")] + legend
        doc += [Img("grid", g) for g in results["grids"]]
    doc += _per_perturbation(results)
    doc += _effects(results)
    items = [f"{name}: {info.get('note', FEATURE_NOTES.get(name, ''))} ({info.get('dim', '?')} dims)"
             for name, info in feats.items()]
    items += [f"{name}: not computed ({why})" for name, why in results.get("features_skipped", {}).items()]
    doc += [H(2, "Features used"), Items(items)]
    _atomic_write(report_dir / "metrics.json", json.dumps(results, indent=2, sort_keys=False) + "\n")
    _atomic_write(report_dir / "metrics.md", to_markdown(doc))
    _atomic_write(report_dir / "index.html", to_html(doc, "phenoflow evaluation report"))
    return report_dir
