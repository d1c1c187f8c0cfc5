"""The study report: study_dir/report.json and report.md.

Tables (metric columns: FD/KD per feature set of the protocol, mean +- std over seeds):
  Table 1 layout   variant, model, training compute (ExaFLOPs), flow, coupling, FD/KD at the variant's best
                   guidance strength w* (lowest seed-mean FD of the first feature set), NFE at w*
  Table 4 layout   the guidance sweep of every variant
  Table 5 layout   the interpolants (linear, VP, bridge at each sigma) when the study has path variants
  Solvers          solver, tolerance or steps, NFE and FD/KD when variants differ in the sampler only
plus real-vs-generated grids (links to the evaluation's images) and the findings paragraph (study/findings.py).

Training compute = the trainer's FLOP count per sample (its log's start record, phenoflow.model.flops for the MiT:
forward + backward = 3 x forward, 2 FLOP per multiply-accumulate) x samples seen. A variant that reuses another's
runs shows the same compute.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from phenoflow.study.runner import Unit, eval_dir, plan, read_status, run_name
from phenoflow.study.spec import Study

METRIC_NAMES = {"dinov2": ("FD_DINOv2", "KD_DINOv2"), "inception": ("FID", "KID"),
                "morphology": ("FD_morph", "KD_morph")}  # as phenoflow.eval.report names them


def _json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _flops_per_sample(run_dir: Path) -> float | None:
    try:
        for line in (run_dir / "log.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "start" and rec.get("train_flops_per_sample"):
                return float(rec["train_flops_per_sample"])
    except (OSError, ValueError):
        pass
    return None


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def _model_name(cfg) -> str:
    m = cfg.model
    if m.arch == "unet":
        return "ADM"
    return f"MiT-{m.size}/{m.patch_size}"


def _path_name(cfg) -> str:
    p = cfg.flow.path
    return {"linear": "linear", "vp": "VP"}.get(p, f"bridge sigma={cfg.flow.bridge_sigma:g}")


def _flow_name(cfg, mode: str) -> str:
    if cfg.flow.coupling == "control" or mode == "control":
        return "control -> perturbed"
    return "noise -> data" + (" (counterfactual)" if mode == "counterfactual" else "")


def _sampler(cfg) -> str:
    e = cfg.eval
    return f"dopri5 rtol={e.rtol:g}" if e.solver == "dopri5" else f"{e.solver} {e.steps} steps"


def collect(study: Study) -> dict[str, Any]:
    """Everything the tables need, per variant (report.json's content)."""
    units = plan(study)
    status = read_status(study)
    evals = [u for u in units if u.kind == "eval"]
    features: list[str] = []
    variants = []
    for v in study.variants:
        mine: list[Unit] = [u for u in evals if u.variant == v.name]
        cfg = mine[0].cfg if mine else None
        seeds, state = [], []
        for u in mine:
            st = status.get(u.name) or ({"state": "unsupported", "message": u.error} if u.error else
                                        {"state": "not run"})
            state.append({"unit": u.name, **st})
            res = None if u.error else _json(eval_dir(study, u) / "metrics.json")
            if res is None:
                continue
            run_dir = u.cfg.run_dir
            export = _json(run_dir / "export" / "model.json") or {}
            fps = _flops_per_sample(run_dir)
            seen = export.get("samples_seen")
            for f in res.get("features", {}):
                if f not in features:
                    features.append(f)
            seeds.append({"seed": u.seed, "run": str(run_dir), "eval": str(eval_dir(study, u)),
                          "flops_per_sample": fps, "samples_seen": seen,
                          "exaflops": fps * seen / 1e18 if fps and seen else None,
                          "sweep": res.get("sweep", []), "grids": res.get("grids", [])})
        row: dict[str, Any] = {"name": v.name, "label": v.label, "config": v.config, "reuse": v.reuse,
                               "eval_mode": v.eval_mode, "units": state, "seeds": seeds}
        if cfg is not None:
            row.update({"model": _model_name(cfg), "arch": cfg.model.arch, "path": cfg.flow.path,
                        "path_name": _path_name(cfg), "bridge_sigma": cfg.flow.bridge_sigma,
                        "coupling": cfg.flow.coupling, "flow": _flow_name(cfg, v.eval_mode),
                        "sampler": _sampler(cfg), "solver": cfg.eval.solver, "rtol": cfg.eval.rtol,
                        "steps": cfg.eval.steps, "total_samples": cfg.train.total_samples})
        variants.append(row)
    if not features:  # nothing evaluated yet: the protocol's feature sets
        features = next((list(u.cfg.eval.features) for u in evals if not u.error), [])
    metric_cols = [m for f in features for m in METRIC_NAMES.get(f, (f"FD_{f}", f"KD_{f}"))]
    for row in variants:
        _summarise(row, metric_cols)
    return {"study": study.name, "description": study.description, "study_dir": str(study.study_dir),
            "features": features, "metrics": metric_cols, "variants": variants}


def _summarise(row: dict[str, Any], metric_cols: list[str]) -> None:
    """Per guidance strength: mean/std over seeds of every metric and NFE; w* = lowest mean of the first FD."""
    by_w: dict[float, list[dict]] = {}
    for s in row["seeds"]:
        for r in s["sweep"]:
            by_w.setdefault(float(r["w"]), []).append(r)
    sweep = []
    for w in sorted(by_w):
        rs = by_w[w]
        cell = {"w": w, "n_seeds": len(rs), "nfe": mean_std([float(r["nfe"]) for r in rs])}
        for m in metric_cols:
            cell[m] = mean_std([r.get("metrics", {}).get(m) for r in rs])
        sweep.append(cell)
    row["sweep"] = sweep
    ex = [s["exaflops"] for s in row["seeds"] if s["exaflops"] is not None]
    row["exaflops"] = mean_std(ex)[0] if ex else None
    row["best"] = None
    if sweep and metric_cols:
        best = min(sweep, key=lambda c: (math.inf if math.isnan(c[metric_cols[0]][0]) else c[metric_cols[0]][0]))
        row["best"] = best


def _fmt(ms: tuple[float, float] | None, n: int, digits: int = 3) -> str:
    if ms is None or math.isnan(ms[0]):
        return "-"
    m, s = ms
    return f"{m:.{digits}g} ± {s:.2g}" if n > 1 else f"{m:.{digits}g}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = (lambda cells: [str(c).replace("|", "\\|") for c in cells])
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(esc(r)) + " |" for r in rows)]


def _not_run(row: dict[str, Any]) -> str:
    bad = [u for u in row["units"] if u.get("state") != "done"]
    if not bad:
        return "not evaluated"
    msg = bad[0].get("message", "").splitlines()
    return f"{bad[0]['state']}" + (f": {msg[0][:160]}" if msg else "")


def table1(data: dict[str, Any]) -> list[str]:
    cols = data["metrics"]
    head = ["Variant", "Model", "ExaFLOPs", "Flow", "Path", "Coupling", *cols, "NFE", "w*", "seeds"]
    rows = []
    for r in data["variants"]:
        b, n = r["best"], len(r["seeds"])
        name = r["name"] + (f" ({r['label']})" if r["label"] else "")
        if b is None:
            rows.append([name, r.get("model", "-"), "-", r.get("flow", "-"), r.get("path_name", "-"),
                         r.get("coupling", "-"), *["-"] * len(cols), "-", "-", _not_run(r)])
            continue
        ef = f"{r['exaflops']:.3g}" if r["exaflops"] is not None else "-"
        rows.append([name, r["model"], ef, r["flow"], r["path_name"],
                     {"ot": "OT", "independent": "independent", "control": "control (same experiment)"}[r["coupling"]],
                     *[_fmt(b[m], n) for m in cols], _fmt(b["nfe"], n), f"{b['w']:g}", str(n)])
    return _table(head, rows)


def table4(data: dict[str, Any]) -> list[str]:
    cols = data["metrics"]
    rows = []
    for r in data["variants"]:
        for c in r["sweep"]:
            rows.append([r["name"], f"{c['w']:g}", *[_fmt(c[m], c["n_seeds"]) for m in cols],
                         _fmt(c["nfe"], c["n_seeds"])])
    return _table(["Variant", "w", *cols, "NFE"], rows)


def has_paths(data: dict[str, Any]) -> bool:
    return len({r.get("path_name") for r in data["variants"] if r["best"] is not None}) > 1


def table5(data: dict[str, Any]) -> list[str]:
    cols = data["metrics"][:2]
    rows = []
    for r in sorted((r for r in data["variants"] if r["best"] is not None and r["eval_mode"] == "generate"
                     and r["coupling"] == "independent"),
                    key=lambda r: ({"linear": 0, "vp": 1}.get(r["path"], 2), r["bridge_sigma"])):
        rows.append([r["path_name"], r["name"], *[_fmt(r["best"][m], len(r["seeds"])) for m in cols],
                     f"{r['best']['w']:g}"])
    return _table(["Interpolant", "Variant", *cols, "w*"], rows)


def has_samplers(data: dict[str, Any]) -> bool:
    return len({r.get("sampler") for r in data["variants"] if r["best"] is not None}) > 1


FD_SAME = 1.05  # "the same FD": at most 5% above the reference's


def solver_verdicts(data: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """Against the reference (the dopri5 variant with the smallest rtol): does each sampler reach the same FD
    (<= 1.05 x) at half the NFE or less? Returns (reference name, {variant: verdict})."""
    fd = data["metrics"][0] if data["metrics"] else None
    rows = [r for r in data["variants"] if r["best"] is not None and fd]
    refs = sorted((r for r in rows if r["solver"] == "dopri5"), key=lambda r: r["rtol"])
    if not refs:
        return None, {}
    ref = refs[0]
    f0, n0 = ref["best"][fd][0], ref["best"]["nfe"][0]
    out = {}
    for r in rows:
        if r is ref:
            out[r["name"]] = "reference"
            continue
        f, n = r["best"][fd][0], r["best"]["nfe"][0]
        ok = f <= FD_SAME * f0 and n <= 0.5 * n0
        out[r["name"]] = (f"{'reaches' if ok else 'does not reach'} it ({fd} {f / f0:.2f}x, NFE {n / n0:.2f}x "
                          f"of the reference)")
    return ref["name"], out


def solver_table(data: dict[str, Any]) -> list[str]:
    cols = data["metrics"][:2]
    ref, verdicts = solver_verdicts(data)
    rows = []
    for r in data["variants"]:
        if r["best"] is None:
            continue
        rows.append([r["name"], r["sampler"], _fmt(r["best"]["nfe"], len(r["seeds"])),
                     *[_fmt(r["best"][m], len(r["seeds"])) for m in cols], f"{r['best']['w']:g}",
                     verdicts.get(r["name"], "-")])
    head = "The goal: the reference's FD (at most 5% above it) at half its NFE or less." if ref else \
        "No dopri5 variant: no reference."
    reached = [n for n, v in verdicts.items() if v.startswith("reaches")]
    tail = (f"Reference: {ref}. Reaching the goal: {', '.join(reached) if reached else 'none'}." if ref else "")
    return [head, "", *_table(["Variant", "Sampler", "NFE", *cols, "w*", "same FD at <= half the NFE"], rows),
            "", tail]


def grid_links(data: dict[str, Any], study_dir: Path) -> list[str]:
    out = []
    for r in data["variants"]:
        for s in r["seeds"][:1]:
            best = r["best"]["w"] if r["best"] else None
            for g in s["grids"]:
                if best is None or g == f"grid_w{best:g}.png":
                    rel = os.path.relpath(Path(s["eval"]) / g, study_dir)
                    out.append(f"- {r['name']} (seed {s['seed']}, {g[5:-4]}): [{g}]({rel})")
    return out or ["(no grids yet)"]


def time_lines(study: Study) -> list[str]:
    """The study's time: unit wall time summed by kind (status.json), and each invocation's wall time
    (timing.json: a killed and rerun study has several)."""
    status = read_status(study)
    by_kind: dict[str, list[float]] = {}
    for name, st in status.items():
        if "seconds" in st:
            by_kind.setdefault(name.split("/")[0], []).append(float(st["seconds"]))
    runs = _json(study.study_dir / "timing.json") or []
    if not by_kind and not runs:
        return []
    out = ["## Time", ""]
    for kind, secs in sorted(by_kind.items(), reverse=True):
        out.append(f"- {kind}: {len(secs)} units, {sum(secs) / 60:.1f} min of unit wall time "
                   f"(longest {max(secs) / 60:.1f} min)")
    for r in runs:
        threads = f" (OMP_NUM_THREADS={r['omp_num_threads']})" if r.get("omp_num_threads") else ""
        gpus = f", {r['gpus']} GPUs" if r.get("gpus") else ""
        out.append(f"- invocation of {r['started']}: {r['wall_s'] / 60:.1f} min wall for {r['units_run']} units, "
                   f"{r['jobs']} at a time, on {r['cpu_count']} CPU cores{threads}{gpus}")
    return [*out, ""]


def write_study_report(study: Study) -> Path:
    from phenoflow.study.findings import findings

    sd = study.study_dir
    sd.mkdir(parents=True, exist_ok=True)
    data = collect(study)
    data["findings"] = findings(data)
    ref, verdicts = solver_verdicts(data)
    data["samplers"] = {"reference": ref, "verdicts": verdicts}
    lines = [f"# Study {study.name}", ""]
    if study.description:
        lines += [study.description, ""]
    lines += [(f"Protocol: features {data['features'] or '-'}; FD/KD at each variant's best guidance strength w* "
              f"(lowest mean {data['metrics'][0] if data['metrics'] else 'FD'}); mean ± std over seeds; KD x 1000. "
              "Training compute in ExaFLOPs (10^18 FLOP, forward + backward, 2 FLOP per multiply-accumulate)."), "",
              "## Table 1 layout", "", *table1(data), "",
              "## Guidance sweep (Table 4 layout)", "", *table4(data), ""]
    if has_paths(data):
        lines += ["## Interpolants (Table 5 layout)", "", *table5(data), ""]
    if has_samplers(data):
        lines += ["## Samplers", "", *solver_table(data), ""]
    lines += ["## Real vs generated", "", *grid_links(data, sd), "", "## Findings", ""]
    lines += [f"- {f['finding']}: {f['verdict']}" for f in data["findings"]]
    lines += ["", *time_lines(study)]
    (sd / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (sd / "report.md").write_text("\n".join(lines) + "\n")
    return sd / "report.md"


__all__ = ["collect", "run_name", "write_study_report"]
